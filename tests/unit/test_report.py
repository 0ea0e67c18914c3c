"""Sweep summaries, cache-rate bands, oracle regret and the output files, on hand-made results."""

import csv
import json

import pytest

from experiments import report as R


def rec(n, L, m, policy, ttft, route=None, bg_extra=0.0, rep=0, ok=True):
    return {
        "test_case": {"context_length": L, "append_length": m, "cache_rate": L / (L + m), "background_streams": n},
        "policy": policy,
        "repetition": rep,
        "ok": ok,
        "route": route or ("prefill" if policy == "prefill" else "decode"),
        "metrics": {
            "ttft_ms": ttft,
            "tpot_ms": 7.0,
            "e2e_latency_ms": ttft + 31 * 7.0,
            "bg_extra_sum_ms": bg_extra,
            "cost_ms": ttft + bg_extra,
            "cost_w0_ms": ttft,
        },
    }


@pytest.mark.parametrize(("rate", "band"), [(0.0, "low"), (0.299, "low"), (0.3, "mid"), (0.8, "mid"), (0.801, "high")])
def test_bands(rate, band):
    assert R.band(rate) == band


def two_points():
    # point A (N=0): D cheaper (100 vs 80); point B (N=32): P cheaper once the others' wait counts
    return [
        rec(0, 16384, 16, "prefill", 100.0),
        rec(0, 16384, 16, "decode", 80.0),
        rec(0, 16384, 16, "auto", 80.0, route="decode"),
        rec(0, 16384, 16, "threshold", 100.0, route="prefill"),
        rec(32, 512, 2048, "prefill", 77.0, bg_extra=32 * 1.0),
        rec(32, 512, 2048, "decode", 76.0, bg_extra=32 * 40.0),
        rec(32, 512, 2048, "auto", 77.0, route="prefill", bg_extra=32 * 1.0),
        rec(32, 512, 2048, "threshold", 76.0, route="decode", bg_extra=32 * 40.0),
    ]


def test_regret_uses_cost_and_forced_oracle():
    table = R.regret_table(two_points(), weight=1.0)
    assert set(table) == {"0", "32"}
    n0 = table["0"]
    assert n0["_oracle"]["mean_cost_ms"] == pytest.approx(80.0)
    assert n0["_oracle"]["decode_best_points"] == 1
    assert n0["decode"]["mean_pct"] == pytest.approx(0.0)
    assert n0["prefill"]["mean_pct"] == pytest.approx(25.0)
    assert n0["prefill"]["mean_ms"] == pytest.approx(20.0)
    assert n0["threshold"]["mean_pct"] == pytest.approx(25.0)
    n32 = table["32"]
    assert n32["_oracle"]["prefill_best_points"] == 1
    assert n32["auto"]["mean_pct"] == pytest.approx(0.0)
    oracle = 77.0 + 32.0
    assert n32["decode"]["mean_ms"] == pytest.approx(76.0 + 1280.0 - oracle)


def test_weight_zero_is_ttft_only():
    table = R.regret_table(two_points(), weight=0.0)
    n32 = table["32"]
    assert n32["_oracle"]["decode_best_points"] == 1  # 76 < 77 on TTFT alone
    assert n32["prefill"]["mean_ms"] == pytest.approx(1.0)


def test_repetitions_are_averaged_per_point():
    rs = [
        rec(0, 512, 1, "prefill", 10.0, rep=0),
        rec(0, 512, 1, "prefill", 30.0, rep=1),
        rec(0, 512, 1, "decode", 25.0, rep=0),
        rec(0, 512, 1, "decode", 25.0, rep=1),
    ]
    table = R.regret_table(rs, 1.0)["0"]
    assert table["_oracle"]["mean_cost_ms"] == pytest.approx(20.0)  # prefill's mean 20 < 25
    assert table["decode"]["mean_ms"] == pytest.approx(5.0)


def test_summary_bands_and_failed_results():
    rs = two_points() + [{**rec(0, 512, 2048, "decode", 1.0), "ok": False, "metrics": None, "error": "boom"}]
    s = R.summarize(rs, 1.0)
    assert s["total_tests"] == 9 and s["ok_tests"] == 8 and s["failed_tests"] == 1
    assert set(s["by_cache_rate"]) == {"high", "low"}  # 16384/16400 high; 512/2560 = 0.2 low
    assert s["by_cache_rate"]["high"]["prefill"]["mean_ttft"] == pytest.approx(100.0)
    assert set(s["by_background"]) == {"0", "32"}
    assert set(s["regret"]) == {"weight_1", "weight_0"}


def test_outputs_written(tmp_path):
    doc = {"config": {"command": "ppd sweep --minimal"}, "start_time": "t0", "end_time": "t1", "results": two_points()}
    paths = R.write_sweep_outputs(doc, tmp_path, "sweep", 1.0)
    names = {p.name for p in paths}
    assert {"sweep.json", "sweep.csv", "sweep.md"} <= names
    assert any(n.endswith("_heatmap_tp_td.png") for n in names)
    assert any(n.endswith("_decision_boundary.png") for n in names)
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = json.loads((tmp_path / "sweep.json").read_text())
    assert loaded["summary"]["total_tests"] == 8
    assert loaded["results"][0]["test_case"]["background_streams"] == 0
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert len(rows) == 8 and rows[0]["ttft_ms"]
    md = (tmp_path / "sweep.md").read_text()
    assert "mean regret %" in md and "| 32 | auto |" in md


def test_regret_by_route_pools_measurements_of_the_same_route():
    # the forced prefill sample was unlucky (150), auto took the same P-route and measured 90: by route both cost 120
    rs = [
        rec(32, 512, 2048, "prefill", 150.0),
        rec(32, 512, 2048, "decode", 100.0, bg_extra=200.0),
        rec(32, 512, 2048, "auto", 90.0, route="prefill"),
    ]
    measured = R.regret_table(rs, 1.0)["32"]
    assert measured["auto"]["mean_ms"] == pytest.approx(90.0 - 150.0)  # negative: beat the forced sample by luck
    by_route = R.regret_table(rs, 1.0, by="route")["32"]
    assert by_route["_oracle"]["mean_cost_ms"] == pytest.approx(120.0)
    assert by_route["auto"]["mean_ms"] == pytest.approx(0.0)
    assert by_route["decode"]["mean_ms"] == pytest.approx(300.0 - 120.0)
    assert by_route["decode"]["total_pct"] == pytest.approx(150.0)
