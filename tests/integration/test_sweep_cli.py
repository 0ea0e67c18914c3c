"""`ppd sweep --minimal --background-streams 0,4` against the embedded stack: the files are produced and well-formed
(their timings are not checked here; experiments/ and results/ are where numbers live), and a rerun resumes."""

import csv
import json
import time

import httpx
import pytest

from ppd.cli import main

pytestmark = pytest.mark.slow

REQUIRED_METRICS = ("ttft_ms", "tpot_ms", "e2e_latency_ms", "kv_bytes", "cost_ms", "cost_w0_ms", "bg_extra_sum_ms")
BG_METRICS = ("bg_tpot_p50_ms", "bg_tpot_p99_ms", "bg_max_gap_ms", "bg_tpot_before_p50_ms")


@pytest.fixture(scope="module")
def sweep_dir(embedded_stack, tmp_path_factory):
    stack = embedded_stack()
    out = tmp_path_factory.mktemp("sweep")
    argv = [
        "sweep",
        "--router-url",
        stack.router_url,
        "--minimal",
        "--background-streams",
        "0,4",
        "--bg-prompt-tokens",
        "256",
        "--bg-output-tokens",
        "160",
        "--bg-before-tokens",
        "4",
        "--max-new-tokens",
        "4",
        "--output-dir",
        str(out),
        "--no-progress",
        "--flush-caches",
    ]
    assert main(argv) == 0
    return out, argv


def test_outputs_well_formed(sweep_dir):
    out, _ = sweep_dir
    doc = json.loads((out / "sweep.json").read_text())
    assert {"config", "start_time", "end_time", "summary", "results"} <= set(doc)
    measured = doc["config"]["policies_measured"]
    assert {"prefill", "decode"} <= set(measured)
    # --flush-caches: every server (1 prefill + 1 decode) emptied before each background level
    flushes = doc["config"]["cache_flushes"]
    assert [f["background_streams"] for f in flushes] == [0, 4]
    assert all(len(f["flushed"]) == 2 and all(f["flushed"].values()) for f in flushes)
    results = doc["results"]
    assert len(results) == 2 * 4 * len(measured)  # N in {0, 4} x 4 grid points x policies
    assert doc["summary"]["total_tests"] == len(results)
    for r in results:
        assert r["ok"], r.get("error")
        tc = r["test_case"]
        assert tc["context_length"] in (1024, 4096) and tc["append_length"] in (16, 1024)
        assert tc["cache_rate"] == pytest.approx(
            tc["context_length"] / (tc["context_length"] + tc["append_length"]), abs=1e-6
        )
        assert tc["background_streams"] in (0, 4)
        assert r["route"] in ("prefill", "decode")
        for k in REQUIRED_METRICS:
            assert r["metrics"][k] is not None, k
        assert r["metrics"]["ttft_ms"] > 0 and r["metrics"]["output_tokens"] == 4
        if tc["background_streams"] == 4:
            for k in BG_METRICS:
                assert r["metrics"][k] is not None, k
    forced = [r for r in results if r["policy"] in ("prefill", "decode")]
    assert all(r["route"] == r["policy"] for r in forced)  # x-ppd-policy forces the route
    assert all(r["metrics"]["kv_bytes"] > 0 for r in forced if r["route"] == "prefill")
    bands = doc["summary"]["by_cache_rate"]
    assert set(bands) <= {"low", "mid", "high"} and "high" in bands
    regret = doc["summary"]["regret"]
    assert set(regret) == {"weight_1", "weight_0"} and set(regret["weight_1"]) == {"0", "4"}

    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == len(results)
    md = (out / "sweep.md").read_text()
    assert "Oracle regret" in md and "| 4 | decode |" in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(
        [
            "sweep_ttft_vs_cache_rate.png",
            "sweep_heatmap_tp_td.png",
            "sweep_route_map.png",
            "sweep_decision_boundary.png",
        ]
    )
    for p in out.glob("*.png"):
        assert p.read_bytes()[:4] == b"\x89PNG"


def test_rerun_resumes(sweep_dir, capsys):
    out, argv = sweep_dir
    before = json.loads((out / "sweep.json").read_text())
    assert main(argv) == 0
    assert "0 measurements to run" in capsys.readouterr().out
    after = json.loads((out / "sweep.json").read_text())
    assert len(after["results"]) == len(before["results"])
    assert after["config"]["resumed_from"] == len(before["results"])


def _metric_sum(router_url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{router_url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def _routed_requests(router_url: str) -> float:
    return _metric_sum(router_url, "ppd_requests_total")


def _wait_router_idle(router_url: str, within_s: float = 30.0) -> None:
    """Until no request is open in the router: one an earlier test left (a client that went away is counted when
    the router notices) must not be counted in this test's window."""
    deadline = time.monotonic() + within_s
    while _metric_sum(router_url, "ppd_inflight") > 0:
        assert time.monotonic() < deadline, "the shared stack's router still has requests open"
        time.sleep(0.1)


def test_background_streams_direct_bypass_the_router(embedded_stack, tmp_path):
    """--bg-direct: the N background streams go straight to the prefill + decode servers (PD protocol); the router
    sees only each point's warm-up and append."""
    stack = embedded_stack()
    _wait_router_idle(stack.router_url)
    before = _routed_requests(stack.router_url)
    argv = ["sweep", "--router-url", stack.router_url, "--validate-only", "--policies", "prefill,decode"]
    argv += ["--background-streams", "3", "--bg-direct", "--bg-prompt-tokens", "128", "--bg-output-tokens", "120"]
    argv += ["--bg-before-tokens", "4", "--max-new-tokens", "4", "--output-dir", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "sweep.json").read_text())
    assert len(doc["results"]) == 2 and all(r["ok"] for r in doc["results"])
    for r in doc["results"]:
        assert r["metrics"]["bg_streams_measured"] == 3
        assert r["metrics"]["bg_tpot_before_p50_ms"] > 0
    # a policy probe per policy, a warm-up and an append per attempt (a point is measured again when a CPU-starved
    # client disturbed the background streams' clock); none of the 3 background streams
    attempts = sum(r["attempts"] for r in doc["results"])
    assert _routed_requests(stack.router_url) - before == 2 + 2 * attempts
