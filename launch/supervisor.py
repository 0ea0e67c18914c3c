"""Process supervisor for the stack: start children in their own process groups, wait for health, stop them all.

Each child gets a new session (so its own process group, and Ctrl-C on the terminal reaches only us: we stop the
children in order), its stdout+stderr in `<log_dir>/<name>.log`, and on Linux a parent-death signal so that even a
`kill -9` of the supervisor leaves no orphan. Stopping = SIGTERM to the whole group, SIGKILL after a grace period.

Python API (tests, experiments):

    with start_stack("configs/local.yaml", overrides=["router.policy=prefill"]) as stack:
        httpx.post(stack.router_url + "/v1/chat/completions", json=...)
"""

from __future__ import annotations

import collections
import ctypes
import datetime
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from launch.plan import READY_TIMEOUT_S, ROUTER_READY_TIMEOUT_S, ProcessSpec, launch_plan, reachable_host
from ppd.config import StackConfig, load_config

STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 40


class LaunchError(RuntimeError):
    """The stack could not start; the message says which process and shows its log tail."""


class ChildExited(LaunchError):
    def __init__(self, name: str, returncode: int | None, log_path: pathlib.Path, tail: str):
        self.name, self.returncode, self.log_path, self.tail = name, returncode, log_path, tail
        super().__init__(
            f"{name} exited with code {returncode} (log: {log_path})\n--- last lines of {log_path} ---\n{tail}"
        )


def log_tail(path: pathlib.Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(collections.deque(f, maxlen=lines)).rstrip("\n")
    except FileNotFoundError:
        return "(no log)"


def new_run_dir(root: str | pathlib.Path = "runs") -> pathlib.Path:
    """runs/<timestamp>/ (with a suffix if two stacks start in the same second)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = pathlib.Path(root)
    for n in range(1000):
        path = root / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise LaunchError(f"cannot create a run directory under {root}")


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((reachable_host(host), port)) == 0


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free TCP ports (bound at once, so no duplicates, then released for the caller to use)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _parent_death_signal() -> Callable[[], None] | None:
    """preexec_fn asking Linux to SIGTERM the child when the supervisor dies (no orphans even after kill -9)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sig = 1, int(signal.SIGTERM)

    def _set() -> None:
        prctl(pr_set_pdeathsig, sig, 0, 0, 0)

    return _set


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids of a process group. Linux reads /proc: a zombie nobody reaps (a container whose init
    does not reap) must not count as alive. Elsewhere: [pgid] if kill(-pgid, 0) finds the group."""
    proc = pathlib.Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses, so split after the last ')'
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


@dataclass
class Child:
    spec: ProcessSpec
    proc: subprocess.Popen
    log_path: pathlib.Path

    @property
    def pgid(self) -> int:
        return self.proc.pid  # start_new_session: the child leads its own group

    def died(self) -> ChildExited | None:
        rc = self.proc.poll()
        if rc is None:
            return None
        return ChildExited(self.spec.name, rc, self.log_path, log_tail(self.log_path))


@dataclass
class Supervisor:
    log_dir: pathlib.Path
    echo: Callable[[str], None] = lambda _msg: None
    children: list[Child] = field(default_factory=list)

    def start(self, spec: ProcessSpec) -> Child:
        log_path = self.log_dir / (spec.log_name or f"{spec.name}.log")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                list(spec.argv),
                cwd=spec.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_parent_death_signal(),
            )
        child = Child(spec, proc, log_path)
        self.children.append(child)
        self.echo(f"started {spec.name} (pid {proc.pid}), log {log_path}")
        return child

    def check(self) -> None:
        """Raise ChildExited for the first child that is no longer running."""
        for child in self.children:
            err = child.died()
            if err is not None:
                raise err

    def wait_ready(self, children: Sequence[Child], timeout_s: float, poll_s: float = 0.2) -> None:
        """Until every child's health_url answers 200; a child that exits meanwhile fails at once."""
        pending = {c.spec.name: c for c in children if c.spec.health_url}
        deadline = time.monotonic() + timeout_s
        t0 = time.monotonic()
        with httpx.Client(timeout=2.0, trust_env=False) as http:
            while pending:
                self.check()
                for name, child in list(pending.items()):
                    try:
                        if http.get(child.spec.health_url).status_code == 200:
                            del pending[name]
                            self.echo(f"{name} ready at {child.spec.url} after {time.monotonic() - t0:.1f} s")
                    except httpx.HTTPError:
                        pass
                if not pending:
                    return
                if time.monotonic() > deadline:
                    names = ", ".join(sorted(pending))
                    tails = "\n".join(
                        f"--- last lines of {c.log_path} ---\n{log_tail(c.log_path)}" for c in pending.values()
                    )
                    raise LaunchError(f"not healthy after {timeout_s:.0f} s: {names}\n{tails}")
                time.sleep(poll_s)

    def wait_any_exit(self, poll_s: float = 0.5) -> ChildExited:
        """Block until some child exits (the normal state of a running stack is: this never returns)."""
        while True:
            for child in self.children:
                err = child.died()
                if err is not None:
                    return err
            time.sleep(poll_s)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM every child's group (last started first), SIGKILL what is left after grace_s; reap all."""
        children = list(reversed(self.children))
        for child in children:
            self._signal(child, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            for child in children:
                child.proc.poll()  # reap the leader so its group can vanish
            if not any(_group_alive(c.pgid) for c in children):
                break
            time.sleep(0.05)
        for child in children:
            if _group_alive(child.pgid):
                self.echo(f"{child.spec.name} did not stop in {grace_s:.0f} s: SIGKILL")
                self._signal(child, signal.SIGKILL)
        for child in children:
            try:
                child.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.children.clear()

    @staticmethod
    def _signal(child: Child, sig: signal.Signals) -> None:
        try:
            os.killpg(child.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def check_ports_free(specs: Sequence[ProcessSpec]) -> None:
    """Fail early, and clearly, if a port of the plan is taken (an earlier stack still running?): otherwise the old
    process would answer our health checks."""
    busy = []
    for spec in specs:
        host = urllib.parse.urlsplit(spec.url).hostname or "127.0.0.1"
        busy += [f"{spec.name}: {host}:{p}" for p in spec.ports if port_in_use(host, p)]
    if busy:
        raise LaunchError(
            "port already in use: " + ", ".join(busy) + " (another stack still running? change it with --set)"
        )


@dataclass
class Stack:
    """A running stack; also a context manager that stops it."""

    config: StackConfig
    specs: list[ProcessSpec]
    log_dir: pathlib.Path
    supervisor: Supervisor

    @property
    def router_url(self) -> str:
        return self._urls("router")[0]

    @property
    def prefill_urls(self) -> list[str]:
        return self._urls("prefill")

    @property
    def decode_urls(self) -> list[str]:
        return self._urls("decode")

    @property
    def colocated_urls(self) -> list[str]:
        return self._urls("colocated")

    @property
    def server_urls(self) -> list[str]:
        """Every backend (prefill, decode, colocated), in plan order."""
        return [s.url for s in self.specs if s.role != "router"]

    def _urls(self, role: str) -> list[str]:
        return [s.url for s in self.specs if s.role == role]

    def log_path(self, name: str) -> pathlib.Path:
        spec = next(s for s in self.specs if s.name == name)
        return self.log_dir / spec.log_name

    def alive(self) -> bool:
        return all(c.proc.poll() is None for c in self.supervisor.children)

    def stop(self) -> None:
        self.supervisor.stop()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def boot(
    specs: Sequence[ProcessSpec],
    supervisor: Supervisor,
    ready_timeout_s: float,
    router_timeout_s: float = ROUTER_READY_TIMEOUT_S,
) -> None:
    """Backends first, all healthy, then the router. On failure the caller stops the supervisor."""
    check_ports_free(specs)
    backends = [supervisor.start(s) for s in specs if s.role != "router"]
    supervisor.wait_ready(backends, ready_timeout_s)
    routers = [supervisor.start(s) for s in specs if s.role == "router"]
    supervisor.wait_ready(routers, router_timeout_s)


def start_stack(
    cfg_path: str | pathlib.Path,
    overrides: Sequence[str] = (),
    log_dir: str | pathlib.Path | None = None,
    ready_timeout_s: float | None = None,
    echo: Callable[[str], None] = lambda _msg: None,
) -> Stack:
    """Start the whole stack and return it once the router is ready (use as `with start_stack(...) as stack:`).
    Raises LaunchError (ChildExited with the log tail) after stopping whatever it had started."""
    overrides = list(overrides)
    cfg = load_config(cfg_path, overrides)
    specs = launch_plan(cfg, cfg_path, overrides)
    run_dir = pathlib.Path(log_dir) if log_dir is not None else new_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.txt").write_text("".join(f"# {s.name}\n{s.command_line()}\n" for s in specs))
    supervisor = Supervisor(run_dir, echo=echo)
    try:
        boot(specs, supervisor, ready_timeout_s or READY_TIMEOUT_S[cfg.backend])
    except BaseException:
        supervisor.stop()
        raise
    return Stack(cfg, list(specs), run_dir, supervisor)
