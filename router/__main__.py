"""`python -m router --config configs/local.yaml [--set router.policy=decode ...]`: serve the AppendRouter."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys

import uvicorn

from ppd.config import ConfigError, load_config
from router.app import create_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router", description=__doc__)
    parser.add_argument("--config", default="configs/local.yaml", help="stack config (YAML)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. router.policy=decode (repeatable)",
    )
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--access-log", action="store_true", help="log every HTTP request (off: it costs CPU)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        app = create_app(cfg)
    except (ConfigError, ValueError, KeyError) as err:
        print(f"router: {err}", file=sys.stderr)
        return 2
    has = importlib.util.find_spec
    uvicorn.run(
        app,
        host=cfg.router.host,
        port=cfg.router.port,
        loop="uvloop" if has("uvloop") else "asyncio",
        http="httptools" if has("httptools") else "h11",
        log_level=args.log_level,
        access_log=args.access_log,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
