"""A KV buffer corrupted in transit changes the answer and is counted; a bad config stops the server at start."""

from __future__ import annotations

import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ppd.config import REPO_ROOT
from ppd.emulator.testing import stack_dict, start_servers, stop_servers
from ppd.emulator.transfer import FLIP_ENV
from ppd.sglang.protocol import LOCAL_APPEND_HOST

pytestmark = pytest.mark.slow


def integrity_errors(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("ppd_emulator_kv_integrity_errors_total{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no integrity counter")


def test_flipped_byte_changes_the_answer_and_is_detected(tmp_path):
    cfg = stack_dict(time_scale=0.05)
    # only the prefill side corrupts what it sends (the env var is read per transfer)
    procs = start_servers(cfg, ("decode",), tmp_path / "d")
    procs |= start_servers(cfg, ("prefill",), tmp_path / "p", env={FLIP_ENV: "1"})
    try:
        d_url, p_url = procs["decode"].url, procs["prefill"].url
        prompt = [random.Random(1).randint(10, 8000) for _ in range(400)]
        sp = {"max_new_tokens": 8, "temperature": 0}
        local = {"input_ids": prompt, "sampling_params": sp, "bootstrap_host": LOCAL_APPEND_HOST}
        local.update(bootstrap_port=0, bootstrap_room=1)
        good = httpx.post(d_url + "/generate", json=local, timeout=30).json()["output_ids"]
        pd = {"input_ids": prompt, "sampling_params": sp, "bootstrap_host": "127.0.0.1"}
        pd.update(bootstrap_port=cfg["prefill"][0]["bootstrap_port"], bootstrap_room=77)
        before = integrity_errors(d_url)
        with ThreadPoolExecutor(2) as pool:
            fp = pool.submit(httpx.post, p_url + "/generate", json=pd, timeout=30)
            fd = pool.submit(httpx.post, d_url + "/generate", json=pd, timeout=30)
            p, d = fp.result(), fd.result()
        assert p.status_code == d.status_code == 200
        bad = d.json()
        assert bad["output_ids"][0] == good[0]  # the first token came from the prefill's own (intact) KV
        assert bad["output_ids"] != good  # the rest from the corrupted bytes the decode server holds
        assert bad["meta_info"]["ppd"]["kv_integrity_ok"] is False
        assert integrity_errors(d_url) == before + 1
    finally:
        stop_servers(procs)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--role", "decode", "--index", "3"], "no decode server with index 3"),
        (["--role", "prefill", "--set", "prefill.0.gpu=tpu9"], "unknown GPU"),
        (["--role", "decode", "--set", "emulator.kv_bytes_scale=1000"], "kv_bytes_scale"),
        (["--role", "decode", "--set", "emulator.time_scale=fast"], "time_scale"),
    ],
)
def test_bad_config_exits_non_zero_with_a_message(args, message):
    cmd = [sys.executable, "-m", "ppd.emulator", "--config", "configs/local.yaml", *args]
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert message in r.stderr
