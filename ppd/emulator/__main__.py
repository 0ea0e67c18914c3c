"""`python -m ppd.emulator --config configs/local.yaml --role prefill|decode|colocated --index 0 [--set k=v ...]`

Serves one emulated SGLang server on its ServerConfig's host:port (and a prefill server's bootstrap endpoint on its
bootstrap_port). Prints one `ppd.emulator ready: ...` line once listening; exits 2 with a message on a bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

import uvicorn

from ppd.config import ConfigError, load_config
from ppd.emulator.app import build_app, build_bootstrap_app
from ppd.emulator.server import ROLES, EmulatedServer, ServerConfigError


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal capture: one handler stops both servers of a prefill process."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _uvicorn(app, host: str, port: int, log_level: str) -> _Uvicorn:
    return _Uvicorn(
        uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, timeout_keep_alive=5)
    )


async def serve(server: EmulatedServer, log_level: str = "warning", ready=None) -> None:
    """Run the server (and its bootstrap endpoint) until SIGINT/SIGTERM or cancellation."""
    await server.start()
    servers = [_uvicorn(build_app(server, manage_lifecycle=False), server.server.host, server.server.port, log_level)]
    if server.role == "prefill":
        servers.append(
            _uvicorn(build_bootstrap_app(server), server.server.host, server.server.bootstrap_port, log_level)
        )
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for s in servers:
            s.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop)
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    try:
        while not all(s.started for s in servers):
            done = [t for t in tasks if t.done()]
            if done:  # a server failed to start (port in use...): uvicorn exits instead of raising
                raise SystemExit(f"ppd.emulator: could not listen on {server.server.host}:{server.server.port}")
            await asyncio.sleep(0.02)
        if ready is not None:
            ready()
        await asyncio.gather(*tasks)
    finally:
        stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.stop()


def ready_line(server: EmulatedServer) -> str:
    s = server.server
    parts = [
        f"ppd.emulator ready: role={server.role} index={server.index} url=http://{s.host}:{s.port}",
        f"gpu={server.gpu.name} model={server.model.name} kv_capacity_tokens={server.capacity_tokens}",
        f"time_scale={server.time_scale} kv_bytes_scale={server.cfg.emulator.kv_bytes_scale}",
    ]
    if server.role == "prefill":
        parts.append(f"bootstrap=http://{s.host}:{s.bootstrap_port}")
    if server.transfer is not None:
        parts.append(f"mooncake={server.transfer.session}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ppd.emulator", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="stack config (YAML)")
    parser.add_argument("--role", required=True, choices=ROLES)
    parser.add_argument("--index", type=int, default=0, help="which server of that role in the config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        server = EmulatedServer(cfg, args.role, args.index)
    except (ConfigError, ServerConfigError) as err:
        print(f"ppd.emulator: bad config: {err}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(server, args.log_level, ready=lambda: print(ready_line(server), flush=True)))
    except SystemExit as err:  # uvicorn exits when it cannot bind (the reason is logged just above)
        s = server.server
        print(f"ppd.emulator: could not serve on {s.host}:{s.port} ({err})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
