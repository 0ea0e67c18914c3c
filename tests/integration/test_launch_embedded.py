"""`ppd launch --config configs/local.yaml` for real (emulated servers + router, on free ports): the README's chat
request is answered through the router, and Ctrl-C leaves no process behind. Also the `embedded_stack` fixture."""

from __future__ import annotations

import os
import pathlib
import re
import selectors
import signal
import subprocess
import sys
import time

import httpx
import pytest

from launch.supervisor import free_ports, group_members
from ppd.config import REPO_ROOT

LOCAL = REPO_ROOT / "configs" / "local.yaml"
ENTRY_POINTS = (REPO_ROOT / "ppd" / "emulator" / "__main__.py", REPO_ROOT / "router" / "__main__.py")
pytestmark = pytest.mark.skipif(
    not all(p.exists() for p in ENTRY_POINTS), reason="ppd.emulator or router entry point not written yet"
)
README_CHAT = {
    "model": "llama-3-8b",
    "messages": [{"role": "user", "content": "What is disaggregated serving?"}],
    "max_tokens": 32,
}


def read_until(proc: subprocess.Popen, needle: str, timeout_s: float) -> str:
    """stdout of proc until a line holds needle (fails on exit or timeout, showing what was printed)."""
    seen = ""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sel.select(timeout=0.5):
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
            if needle in line:
                return seen
    raise AssertionError(f"{needle!r} not printed within {timeout_s} s (rc={proc.poll()}); stdout: {seen}")


def test_ppd_launch_answers_the_readme_request_and_ctrl_c_stops_everything(tmp_path: pathlib.Path):
    p, boot, d, r = free_ports(4)
    sets = [f"prefill.0.port={p}", f"prefill.0.bootstrap_port={boot}", f"decode.0.port={d}", f"router.port={r}"]
    argv = [sys.executable, "-m", "ppd.cli", "launch", "--config", str(LOCAL), "--log-dir", str(tmp_path)]
    for s in sets:
        argv += ["--set", s]
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = read_until(proc, "AppendRouter ready at", timeout_s=90)
        assert f"AppendRouter ready at http://127.0.0.1:{r} (policy auto)" in banner
        resp = httpx.post(f"http://127.0.0.1:{r}/v1/chat/completions", json=README_CHAT, timeout=60, trust_env=False)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["object"] == "chat.completion" and body["model"] == "llama-3-8b"
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert 0 < body["usage"]["completion_tokens"] <= 32
        assert resp.headers["x-ppd-route"] in ("prefill", "decode")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    pids = [int(x) for x in re.findall(r"started \S+ \(pid (\d+)\)", err)]
    assert len(pids) == 3  # prefill-0, decode-0, router
    assert all(group_members(pid) == [] for pid in pids), err
    assert {f.name for f in tmp_path.iterdir()} >= {"prefill-0.log", "decode-0.log", "router.log", "plan.txt"}


def test_embedded_stack_fixture_serves_on_free_ports(embedded_stack):
    stack = embedded_stack(policy="prefill")
    assert stack.alive()
    with httpx.Client(timeout=30, trust_env=False) as http:
        for url in stack.server_urls:
            assert http.get(url + "/health").status_code == 200
        models = http.get(stack.router_url + "/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["llama-3-8b"]
        resp = http.post(stack.router_url + "/v1/chat/completions", json=README_CHAT)
        assert resp.status_code == 200 and resp.headers["x-ppd-route"] == "prefill"
    assert embedded_stack(policy="prefill") is stack  # shared for the session
    assert os.path.isdir(stack.log_dir)
