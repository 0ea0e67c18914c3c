"""`ppd launch`: start the backends of a config, wait until healthy, start the router, print the endpoint.

    ppd launch --config configs/local.yaml [--set router.policy=decode ...] [--log-dir DIR] [--dry-run]

Ctrl-C (or SIGTERM) stops every child (SIGTERM to its process group, SIGKILL after a grace period). Exit code 0 after
a requested stop; 1 if a child dies or a backend does not become healthy (its log tail is shown).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import sys
from types import FrameType

import httpx

from launch.plan import READY_TIMEOUT_S, ROUTER_READY_TIMEOUT_S, ProcessSpec, launch_plan
from launch.supervisor import STOP_GRACE_S, LaunchError, Supervisor, boot, new_run_dir
from ppd.config import ConfigError, StackConfig, load_config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "launch",
        help="start the serving stack (backends + AppendRouter)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="configs/local.yaml", help="stack config YAML (default configs/local.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set router.policy=decode --set decode.0.port=31001 (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="print every command line with its env and exit")
    p.add_argument("--log-dir", default=None, help="where children's logs go (default runs/<timestamp>/)")
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=None,
        help=f"seconds to wait for backends' /health (default: emulated {READY_TIMEOUT_S['emulated']:.0f}, "
        f"sglang {READY_TIMEOUT_S['sglang']:.0f})",
    )
    p.add_argument(
        "--only",
        metavar="NAME",
        default=None,
        help="run only this process of the plan (prefill-0, decode-0, router, ...) in the foreground, replacing "
        "this one: one process per container or systemd unit, same command line as the full launch",
    )
    p.add_argument(
        "--check",
        metavar="NAME",
        default=None,
        help="exit 0 if this process of the plan answers its health URL with 200, else 1 (container health checks)",
    )
    p.add_argument("--stop-grace", type=float, default=STOP_GRACE_S, help="seconds between SIGTERM and SIGKILL")
    p.set_defaults(func=run)


def _say(msg: str) -> None:
    print(f"[ppd launch] {msg}", file=sys.stderr, flush=True)


class _Stop(Exception):
    pass


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def ready_banner(cfg: StackConfig, router: ProcessSpec) -> str:
    body = json.dumps(
        {"model": cfg.model.served_name, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}
    )
    return (
        f"AppendRouter ready at {router.url} (policy {cfg.router.policy}) — try:\n"
        f"  curl {router.url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'\n"
        f"Ctrl-C stops everything."
    )


def healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def exec_process(spec: ProcessSpec) -> int:
    """Become the process (signals from docker/systemd reach it directly, no supervisor in between)."""
    _say(f"exec {spec.command_line()}")
    os.chdir(spec.cwd)
    os.execvpe(spec.argv[0], list(spec.argv), {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env})
    return 1  # not reached


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        specs = launch_plan(cfg, args.config, args.overrides)
    except ConfigError as err:
        print(f"ppd launch: bad config: {err}", file=sys.stderr)
        return 2
    if args.only or args.check:
        name = args.only or args.check
        by_name = {s.name: s for s in specs}
        if name not in by_name:
            print(f"ppd launch: no process {name!r} in the plan; have {', '.join(by_name)}", file=sys.stderr)
            return 2
        spec = by_name[name]
        if args.check:
            return 0 if healthy(spec.health_url) else 1
        if args.dry_run:
            print(spec.command_line())
            return 0
        return exec_process(spec)
    if args.dry_run:
        for spec in specs:
            print(spec.command_line())
        return 0

    log_dir = new_run_dir() if args.log_dir is None else _mkdir(args.log_dir)
    timeout_s = args.ready_timeout or READY_TIMEOUT_S[cfg.backend]
    return serve(cfg, specs, log_dir, timeout_s, args.stop_grace)


def serve(
    cfg: StackConfig, specs: list[ProcessSpec], log_dir: pathlib.Path, ready_timeout_s: float, grace_s: float
) -> int:
    """Run the plan until Ctrl-C/SIGTERM (exit 0) or until a child dies (exit 1); always stop every child."""
    (log_dir / "plan.txt").write_text("".join(f"# {s.name}\n{s.command_line()}\n" for s in specs))
    supervisor = Supervisor(log_dir, echo=_say)
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    _say(f"{cfg.backend} backend, mode {cfg.mode}; logs in {log_dir}")
    try:
        boot(specs, supervisor, ready_timeout_s, ROUTER_READY_TIMEOUT_S)
        print(ready_banner(cfg, specs[-1]), flush=True)
        died = supervisor.wait_any_exit()
        _say(str(died))
        return 1
    except LaunchError as err:
        _say(f"start failed: {err}")
        return 1
    except (KeyboardInterrupt, _Stop) as why:
        _say(f"stopping ({str(why) or 'Ctrl-C'})")
        return 0
    finally:
        # a second Ctrl-C or SIGTERM during the stop must not interrupt it and leave children behind
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        supervisor.stop(grace_s)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _say("all processes stopped")


def _mkdir(path: str) -> pathlib.Path:
    p = pathlib.Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p
