"""Helpers for the emulator's tests and benchmarks: in-process servers and requests, subprocess servers on free ports."""

from __future__ import annotations

import asyncio
import os
import pathlib
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import yaml

from ppd.config import REPO_ROOT, parse_config
from ppd.emulator.engine import Job
from ppd.emulator.schemas import parse_generate
from ppd.emulator.server import EmulatedServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stack_dict(time_scale: float = 0.01, **emulator) -> dict:
    """A config with one server of each role on free ports."""
    return {
        "mode": "disaggregated",
        "backend": "emulated",
        "model": {"spec": "llama-3-8b", "tokenizer": "builtin", "context_length": 65536},
        "link": {"kind": "nvlink"},
        "prefill": [{"host": "127.0.0.1", "port": free_port(), "bootstrap_port": free_port(), "gpu": "h200"}],
        "decode": [{"host": "127.0.0.1", "port": free_port(), "gpu": "h200"}],
        "colocated": [{"host": "127.0.0.1", "port": free_port(), "gpu": "h200"}],
        "emulator": {"time_scale": time_scale, "kv_bytes_scale": 1024, **emulator},
    }


def in_process(role: str = "colocated", time_scale: float = 0.01, **emulator) -> EmulatedServer:
    return EmulatedServer(parse_config(stack_dict(time_scale, **emulator)), role, 0)


@dataclass
class Run:
    server: EmulatedServer
    job: Job
    token_times: list[float] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return list(self.job.output_ids)

    @property
    def meta(self) -> dict:
        return self.server.output(self.job)["meta_info"]


async def generate(server: EmulatedServer, ids, max_new: int = 8, watch: bool = True, **body) -> Run:
    """Submit a request in-process and follow it to the end, stamping each token (loop clock)."""
    sp = {"max_new_tokens": max_new, "temperature": 0, **body.pop("sampling_params", {})}
    req = parse_generate(
        {"input_ids": list(ids), "sampling_params": sp, **body},
        vocab_size=server.input_vocab_size,
        context_length=server.cfg.model.context_length,
    )
    loop = asyncio.get_running_loop()
    job = server.submit(req, loop.time())
    run = Run(server, job)
    if not watch:
        return run
    await follow(run)
    return run


async def follow(run: Run) -> Run:
    loop = asyncio.get_running_loop()
    job = run.job
    seen = 0
    while True:
        await job.changed.wait()
        job.changed.clear()
        now = loop.time()
        if len(job.output_ids) > seen:
            run.token_times += [now] * (len(job.output_ids) - seen)
            seen = len(job.output_ids)
        if job.finished:
            return run


# ---- subprocess servers ------------------------------------------------------------------------------------------
@dataclass
class Proc:
    role: str
    url: str
    popen: subprocess.Popen
    log: pathlib.Path


def start_servers(cfg: dict, roles, tmp: pathlib.Path, env: dict | None = None, timeout_s: float = 60) -> dict:
    """`python -m ppd.emulator` for each role of `cfg` (written to tmp); waits for each ready line."""
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "stack.yaml"
    path.write_text(yaml.safe_dump(cfg))
    procs: dict[str, Proc] = {}
    full_env = {**os.environ, **(env or {})}
    for role in roles:
        log = tmp / f"{role}.log"
        popen = subprocess.Popen(
            [sys.executable, "-m", "ppd.emulator", "--config", str(path), "--role", role],
            stdout=open(log, "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=full_env,
        )
        server = cfg[role][0]
        procs[role] = Proc(role, f"http://{server['host']}:{server['port']}", popen, log)
    deadline = time.time() + timeout_s
    try:
        for p in procs.values():
            while "ppd.emulator ready" not in p.log.read_text():
                if p.popen.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{p.role} did not start:\n{p.log.read_text()[-3000:]}")
                time.sleep(0.05)
    except BaseException:
        stop_servers(procs)
        raise
    return procs


def stop_servers(procs: dict) -> None:
    for p in procs.values():
        if p.popen.poll() is None:
            p.popen.terminate()
    for p in procs.values():
        try:
            p.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.popen.kill()
