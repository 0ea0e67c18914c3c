"""The supervisor with stand-in children (tiny HTTP servers that also fork a grandchild): health wait, a child dying
at start, Ctrl-C / SIGTERM of `ppd launch`'s serve loop, SIGKILL of a child that ignores SIGTERM, no orphans."""

from __future__ import annotations

import json
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from launch.plan import ProcessSpec
from launch.supervisor import ChildExited, LaunchError, Supervisor, boot, free_ports, group_members
from ppd.config import REPO_ROOT

# A backend stand-in: answers 200 on /health, forks a grandchild into its process group, prints its pid.
STANDIN = textwrap.dedent(
    """
    import http.server, signal, subprocess, sys
    port, stubborn = int(sys.argv[1]), sys.argv[2] == "stubborn"
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = subprocess.Popen(["sleep", "300"])
    print(f"grandchild {grandchild.pid}", flush=True)

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass

    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)
DIES = "import sys; print('loading model...'); print('RuntimeError: boom, no GPU here', flush=True); sys.exit(3)"


def standin(name: str, role: str, port: int, stubborn: bool = False) -> ProcessSpec:
    url = f"http://127.0.0.1:{port}"
    argv = (sys.executable, "-c", STANDIN, str(port), "stubborn" if stubborn else "plain")
    return ProcessSpec(name, role, argv, health_url=url + "/health", url=url, log_name=f"{name}.log", ports=(port,))


def dying(name: str) -> ProcessSpec:
    return ProcessSpec(name, "decode", (sys.executable, "-c", DIES), health_url="http://127.0.0.1:9/health")


def grandchildren(log_dir: pathlib.Path) -> list[int]:
    pids = []
    for log in log_dir.glob("*.log"):
        pids += [int(m) for m in re.findall(r"grandchild (\d+)", log.read_text())]
    return pids


def alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pids: list[int], timeout_s: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def test_boot_waits_for_health_then_stop_leaves_no_process(tmp_path):
    p, d, r = free_ports(3)
    specs = [standin("prefill-0", "prefill", p), standin("decode-0", "decode", d), standin("router", "router", r)]
    sup = Supervisor(tmp_path)
    boot(specs, sup, ready_timeout_s=20)
    pgids = [c.pgid for c in sup.children]
    assert [c.spec.name for c in sup.children] == ["prefill-0", "decode-0", "router"]
    assert all(c.proc.poll() is None for c in sup.children)
    kids = grandchildren(tmp_path)
    assert len(kids) == 3 and all(alive(k) for k in kids)
    sup.stop(grace_s=5)
    assert all(group_members(g) == [] for g in pgids)
    assert wait_gone(kids) == []


def test_child_dying_at_start_raises_with_its_log_tail_and_stops_the_others(tmp_path):
    (p,) = free_ports(1)
    sup = Supervisor(tmp_path)
    with pytest.raises(ChildExited) as info:
        try:
            boot([standin("prefill-0", "prefill", p), dying("decode-0")], sup, ready_timeout_s=20)
        finally:
            pgids = [c.pgid for c in sup.children]
            sup.stop(grace_s=5)
    err = info.value
    assert err.name == "decode-0" and err.returncode == 3
    assert "RuntimeError: boom, no GPU here" in err.tail and "loading model" in err.tail
    assert "RuntimeError: boom" in str(err)
    assert all(group_members(g) == [] for g in pgids)
    assert wait_gone(grandchildren(tmp_path)) == []


def test_stubborn_child_is_killed_after_the_grace_period(tmp_path):
    (p,) = free_ports(1)
    sup = Supervisor(tmp_path)
    boot([standin("decode-0", "decode", p, stubborn=True)], sup, ready_timeout_s=20)
    pgid = sup.children[0].pgid
    t0 = time.monotonic()
    sup.stop(grace_s=1.0)
    assert 0.9 < time.monotonic() - t0 < 8
    assert group_members(pgid) == []


def test_port_already_taken_fails_before_starting_anything(tmp_path):
    p, d = free_ports(2)
    sup = Supervisor(tmp_path)
    boot([standin("prefill-0", "prefill", p)], sup, ready_timeout_s=20)
    try:
        other = Supervisor(tmp_path / "other")
        (tmp_path / "other").mkdir()
        with pytest.raises(LaunchError, match=rf"port already in use: prefill-0: 127.0.0.1:{p}"):
            boot([standin("prefill-0", "prefill", p), standin("decode-0", "decode", d)], other, ready_timeout_s=20)
        assert other.children == []
    finally:
        sup.stop(grace_s=5)


# `ppd launch`'s serve loop in its own process, driven by signals the way a terminal or systemd would.
DRIVER = textwrap.dedent(
    """
    import json, pathlib, sys
    from launch.cli import serve
    from launch.plan import ProcessSpec
    from ppd.config import load_config
    specs = [ProcessSpec(**{**s, "argv": tuple(s["argv"]), "ports": tuple(s["ports"])}) for s in json.loads(sys.argv[1])]
    cfg = load_config("configs/local.yaml")
    sys.exit(serve(cfg, specs, pathlib.Path(sys.argv[2]), ready_timeout_s=20, grace_s=3))
    """
)


def run_driver(specs: list[ProcessSpec], log_dir: pathlib.Path) -> subprocess.Popen:
    payload = json.dumps([{**s.__dict__, "env": dict(s.env)} for s in specs])
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, payload, str(log_dir)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def started_pids(stderr: str) -> list[int]:
    return [int(p) for p in re.findall(r"started \S+ \(pid (\d+)\)", stderr)]


def wait_for_line(stream, needle: str, timeout_s: float = 30) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen; got {lines}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_every_child_on_ctrl_c_or_sigterm(tmp_path, sig):
    p, r = free_ports(2)
    proc = run_driver([standin("decode-0", "decode", p), standin("router", "router", r)], tmp_path)
    try:
        wait_for_line(proc.stdout, "AppendRouter ready at http://127.0.0.1:")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "all processes stopped" in err
    pids = started_pids(err)
    assert len(pids) == 2
    assert all(group_members(pid) == [] for pid in pids)  # each child led its own group
    assert wait_gone(grandchildren(tmp_path)) == []


def test_serve_exits_nonzero_with_the_log_tail_when_a_child_dies_at_start(tmp_path):
    p, r = free_ports(2)
    proc = run_driver([standin("prefill-0", "prefill", p), dying("decode-0"), standin("router", "router", r)], tmp_path)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "decode-0 exited with code 3" in err and "RuntimeError: boom, no GPU here" in err
    assert "AppendRouter ready" not in out
    assert all(group_members(pid) == [] for pid in started_pids(err))
    assert wait_gone(grandchildren(tmp_path)) == []
