"""Overload: admission control on the real stack (router process + emulated servers on loopback).

With tiny limits (2 requests in flight), a flood of concurrent requests is shed at once: the excess gets 429 with
Retry-After and an OpenAI-style body, fast (the router does not queue it), the admitted ones finish, and every
rejection is counted in /metrics. A router with no healthy backend answers 503 with Retry-After. And `ppd load` in the
overload case (rate far above what 2 slots serve) ends with every request answered or explicitly refused: LOST = 0.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time

import httpx
import pytest
import uvicorn

from launch.supervisor import free_ports
from ppd.config import REPO_ROOT, load_config
from router.app import create_app

pytestmark = pytest.mark.slow

MODEL = "llama-3-8b"
LIMIT = 2
FLOOD = 12


@pytest.fixture(scope="module")
def stack(embedded_stack):
    return embedded_stack(
        extra_overrides=[
            f"router.max_inflight_per_backend={LIMIT}",
            f"router.max_inflight_total={LIMIT}",
            "router.metrics_poll_interval_s=0.2",
        ],
    )


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of one Prometheus series' samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


async def _one(client: httpx.AsyncClient, i: int) -> dict:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"flood {i}: tell me a long story"}],
        "max_tokens": 150,  # ~1 s of decoding at time_scale 1: the two admitted requests hold their slots
        "ignore_eos": True,
        "stream": True,
    }
    t0 = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body, headers={"x-ppd-policy": "decode"}) as resp:
        raw = await resp.aread()
    return {
        "status": resp.status_code,
        "seconds": time.perf_counter() - t0,
        "retry_after": resp.headers.get("retry-after"),
        "body": raw.decode(),
    }


def test_flood_is_shed_with_429_retry_after_and_counted(stack):
    async def flood() -> list[dict]:
        async with httpx.AsyncClient(base_url=stack.router_url, timeout=60) as client:
            return await asyncio.gather(*(_one(client, i) for i in range(FLOOD)))

    before = httpx.get(stack.router_url + "/metrics").text
    results = asyncio.run(flood())
    ok = [r for r in results if r["status"] == 200]
    rejected = [r for r in results if r["status"] == 429]
    assert len(ok) + len(rejected) == FLOOD, [r["status"] for r in results]
    assert 1 <= len(ok) <= LIMIT + 2  # at most LIMIT at a time; a late arrival may find a slot freed
    assert len(rejected) >= FLOOD - LIMIT - 2
    for r in ok:
        assert r["body"].rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in r["body"]
    for r in rejected:
        assert r["retry_after"] and int(r["retry_after"]) >= 1
        err = json.loads(r["body"])["error"]
        assert err["type"] == "rate_limit_exceeded" and "limit" in err["message"] and "code" in err and "param" in err
    # fail fast: refused long before an admitted request finishes (medians: robust to a stall of the shared CPU)
    assert statistics.median(r["seconds"] for r in rejected) < statistics.median(r["seconds"] for r in ok) / 4
    after = httpx.get(stack.router_url + "/metrics").text
    shed = metric(after, "ppd_admission_rejected_total") - metric(before, "ppd_admission_rejected_total")
    assert shed == len(rejected)
    counted = metric(after, "ppd_requests_total", outcome="rejected") - metric(
        before, "ppd_requests_total", outcome="rejected"
    )
    assert counted == len(rejected)
    # the slots came back: a request after the flood is served
    assert metric(after, "ppd_inflight") == 0
    again = httpx.post(
        stack.router_url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "after the flood"}], "max_tokens": 4},
        timeout=30,
    )
    assert again.status_code == 200


async def test_no_healthy_backend_is_503_with_retry_after():
    """A router whose backends are all down (nothing listens on their ports) refuses with 503, says when to retry,
    reports not-ready, and counts the refusals."""
    ports = free_ports(4)
    cfg = load_config(
        REPO_ROOT / "configs" / "local.yaml",
        [
            f"prefill.0.port={ports[0]}",
            f"prefill.0.bootstrap_port={ports[1]}",
            f"decode.0.port={ports[2]}",
            "router.health_interval_s=0.1",
            "router.connect_timeout_s=0.5",
        ],
    )
    server = uvicorn.Server(uvicorn.Config(create_app(cfg), host="127.0.0.1", port=ports[3], log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[3]}", timeout=10) as client:
            for _ in range(100):  # the first health round marks both servers down
                ready = await client.get("/ready")
                if set(ready.json()["backends"].values()) == {"unhealthy"}:
                    break
                await asyncio.sleep(0.05)
            assert ready.status_code == 503 and ready.json()["ready"] is False
            for path, body in (
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "anyone?"}]}),
                ("/v1/completions", {"prompt": "anyone?"}),
            ):
                t0 = time.perf_counter()
                resp = await client.post(path, json={"model": MODEL, "max_tokens": 4, **body})
                assert resp.status_code == 503
                assert time.perf_counter() - t0 < 2.0  # no connect attempt to a server known to be down
                assert int(resp.headers["retry-after"]) >= 1
                err = resp.json()["error"]
                assert err["type"] == "service_unavailable" and err["code"] == "no_healthy_backend"
                assert "healthy" in err["message"]
            text = (await client.get("/metrics")).text
            assert metric(text, "ppd_requests_total", outcome="rejected") == 2
            assert metric(text, "ppd_backend_healthy") == 0
    finally:
        server.should_exit = True
        await serving


def test_ppd_load_overload_loses_nothing(stack, tmp_path):
    """`ppd load` at a rate far above what 2 slots serve: many 429s, zero lost, the report written."""
    cmd = [
        sys.executable,
        "-m",
        "ppd.cli",
        "load",
        "--router-url",
        stack.router_url,
        "--requests",
        "60",
        "--rate",
        "60",
        "--prompt-tokens",
        "256",
        "--max-tokens",
        "16",
        "--overhead-pairs",
        "5",
        "--overhead-rate",
        "20",
        "--timeout-s",
        "30",
        "--name",
        "overload",
        "--output-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "overload.json").read_text())
    load = report["load"]
    assert load["requests"] == 60 and load["lost"] == 0 and load["error"] == 0
    assert load["ok"] >= 2 and load["rejected"] >= 20  # far above the service rate of 2 slots
    assert load["rejected_with_retry_after"] == load["rejected"]
    assert load["errors_openai_shape"] == load["rejected"]
    assert load["reject_ms"]["p50"] < load["e2e_ms"]["p50"] / 2  # a refusal comes back faster than an answer
    # overhead pairs ran in the same run: router and direct both answered (the router may shed some of its half)
    assert report["overhead"]["direct"]["ok"] == 5 and report["overhead"]["direct"]["lost"] == 0
    assert report["overhead"]["router"]["lost"] == 0
    md = (tmp_path / "overload.md").read_text()
    assert "ppd load --router-url" in md and "| overload | 60 | 60 |" in md
    assert (tmp_path / "README.md").exists()
