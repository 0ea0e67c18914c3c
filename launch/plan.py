"""The launch plan: which processes `ppd launch` starts, in what order, with which command lines and environment.

`launch_plan(cfg, config_path, overrides)` is pure: it reads the config and returns frozen `ProcessSpec`s (backends
first, the router last). The supervisor runs them; `ppd launch --dry-run` prints them; CI asserts them.
"""

from __future__ import annotations

import pathlib
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ppd.config import REPO_ROOT, ConfigError, ServerConfig, StackConfig
from ppd.sglang.launch_args import Role, server_argv, server_env

# how long to wait for every backend's /health (a real SGLang start loads weights and captures CUDA graphs)
READY_TIMEOUT_S = {"emulated": 60.0, "sglang": 600.0}
ROUTER_READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ProcessSpec:
    """One child process of the stack."""

    name: str  # prefill-0, decode-0, colocated-0, router
    role: str  # prefill | decode | colocated | router
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)  # added to the parent's environment
    health_url: str = ""  # answers 200 once the process is ready
    url: str = ""  # where clients reach it
    cwd: str = str(REPO_ROOT)
    log_name: str = ""  # file name in the run's log dir
    ports: tuple[int, ...] = ()  # TCP ports it listens on (checked free before the start)

    def command_line(self) -> str:
        """One shell line: env assignments, then the argv (what --dry-run prints)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        cmd = shlex.join(self.argv)
        return f"{env} {cmd}" if env else cmd


def reachable_host(host: str) -> str:
    """A wildcard bind address is reached on loopback."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _url(host: str, port: int) -> str:
    return f"http://{reachable_host(host)}:{port}"


def _roles(cfg: StackConfig) -> list[tuple[Role, int, ServerConfig]]:
    out: list[tuple[Role, int, ServerConfig]] = []
    for role, servers in (("prefill", cfg.prefill), ("decode", cfg.decode), ("colocated", cfg.colocated)):
        out.extend((role, i, s) for i, s in enumerate(servers))  # type: ignore[misc]
    return out


def _check_ports(cfg: StackConfig) -> None:
    """Two listeners of the plan on one host:port would fail at start (or worse, answer each other's health checks)."""
    seen: dict[tuple[str, int], str] = {}
    listeners = [(f"{r}.{i}.port", s.host, s.port) for r, i, s in _roles(cfg)]
    listeners += [(f"{r}.{i}.bootstrap_port", s.host, s.bootstrap_port) for r, i, s in _roles(cfg) if r == "prefill"]
    listeners.append(("router.port", cfg.router.host, cfg.router.port))
    for name, host, port in listeners:
        if port is None:
            continue
        for (other_host, other_port), other in seen.items():
            same_host = reachable_host(host) == reachable_host(other_host) or "0.0.0.0" in (host, other_host)
            if port == other_port and same_host:
                raise ConfigError(f"{name}: port {port} is already {other}")
        seen[(host, port)] = name


def _set_flags(overrides: Sequence[str]) -> list[str]:
    flags: list[str] = []
    for item in overrides:
        flags += ["--set", item]
    return flags


def launch_plan(
    cfg: StackConfig,
    config_path: str | pathlib.Path,
    overrides: Sequence[str] = (),
    python: str = sys.executable,
) -> list[ProcessSpec]:
    """Every process of the stack: one per server of the config (prefill, decode, colocated), then the router.

    Emulated servers and the router read the same config file and overrides, so they agree with this plan by
    construction; real SGLang servers get their flags from ppd.sglang.launch_args.
    """
    _check_ports(cfg)
    config_arg = str(pathlib.Path(config_path).resolve())
    sets = _set_flags(overrides)
    specs: list[ProcessSpec] = []
    for role, index, server in _roles(cfg):
        name = f"{role}-{index}"
        if cfg.backend == "emulated":
            argv = (python, "-m", "ppd.emulator", "--config", config_arg, "--role", role, "--index", str(index), *sets)
            env: dict[str, str] = {}
        else:
            argv = tuple(server_argv(cfg, server, role, python=python))
            env = server_env(cfg, server, role)
        specs.append(
            ProcessSpec(
                name=name,
                role=role,
                argv=argv,
                env=env,
                health_url=_url(server.host, server.port) + "/health",
                url=_url(server.host, server.port),
                log_name=f"{name}.log",
                ports=(server.port,)
                + ((server.bootstrap_port,) if role == "prefill" and server.bootstrap_port else ()),
            )
        )
    router_url = _url(cfg.router.host, cfg.router.port)
    specs.append(
        ProcessSpec(
            name="router",
            role="router",
            argv=(python, "-m", "router", "--config", config_arg, *sets),
            health_url=router_url + "/ready",  # 200 once the router sees healthy backends: requests will work
            url=router_url,
            log_name="router.log",
            ports=(cfg.router.port,),
        )
    )
    return specs
