"""A small `ppd bench` against the embedded stacks it starts itself (colocated and disaggregated; one cell, one rate, a
few seconds) and a short `ppd simulate`: the files are produced and well-formed (no timing assertions)."""

import json

import pytest

from ppd.cli import main
from ppd.config import REPO_ROOT

pytestmark = pytest.mark.slow


def test_small_bench_both_modes(tmp_path):
    for entry in ("ppd/emulator/__main__.py", "router/__main__.py"):
        if not (REPO_ROOT / entry).exists():
            pytest.skip(f"not written yet: {entry}")
    out = tmp_path / "bench"
    argv = [
        "bench",
        "--config",
        str(REPO_ROOT / "configs" / "local.yaml"),
        "--colocated-config",
        str(REPO_ROOT / "configs" / "local-colocated.yaml"),
        "--mode",
        "colocated,disaggregated",
        "--policies",
        "prefill,auto",
        "--cells",
        "light-light",
        "--rates",
        "4",
        "--duration-s",
        "2",
        "--time-scale",
        "1",
        "--light-output-tokens",
        "8",
        "--output-dir",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    doc = json.loads((out / "bench.json").read_text())
    assert doc["backend"] == "emulated" and doc["command"].startswith("ppd bench")
    assert {s["label"] for s in doc["systems"]} == {"colocated", "pd-prefill", "pd-auto"}
    assert {r["system"] for r in doc["runs"]} == {"colocated", "pd-prefill", "pd-auto"}
    assert {doc["stacks"]["colocated"]["servers"], doc["stacks"]["disaggregated"]["servers"]} == {2}
    for run in doc["runs"]:
        assert run["cell"] == "light-light" and run["rate"] == 4
        assert run["ok"] == run["requests"] > 0, run
        assert run["ttft_p99_ms"] >= run["ttft_p50_ms"] > 0
        assert run["tpot_p50_ms"] > 0 and run["decode_tokens_per_s"] > 0
        assert 0 <= run["goodput_rps"] and 0 <= run["slo_attainment"] <= 1
        assert run["prompt_length_mismatches"] == 0  # the router saw exactly the trace's prompt lengths
        recs = doc["requests"][f"{run['system']}/light-light/4"]
        assert len(recs) == run["requests"] and all(r["output_tokens"] == 8 for r in recs)
    routes = {r["system"]: r["route_share"] for r in doc["runs"]}
    assert routes["colocated"] == {"colocated": 1.0} and routes["pd-prefill"] == {"prefill": 1.0}
    md = (out / "bench.md").read_text()
    assert "| cell | rate req/s | colocated | pd-prefill | pd-auto |" in md and "ppd bench" in md
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_short_simulate(tmp_path):
    out = tmp_path / "sim"
    argv = ["simulate", "--prefill", "1", "--decode", "1", "--workload", "chat", "--rate", "2", "--duration", "10"]
    assert main([*argv, "--out-dir", str(out), "--quiet"]) == 0
    doc = json.loads((out / "simulate.json").read_text())
    (row,) = doc["results"]
    assert row["ratio"] == "1:1" and row["requests"] > 0 and row["goodput_rps"] >= 0
    assert "| P:D |" in (out / "simulate.md").read_text()
    assert (out / "trace.jsonl").read_text().count("\n") >= row["requests"]


def test_simulated_bench(tmp_path):
    out = tmp_path / "bsim"
    argv = ["bench", "--simulate", "--cells", "heavy-light,multiturn", "--rates", "2,4", "--duration-s", "6"]
    assert main([*argv, "--output-dir", str(out), "--quiet"]) == 0
    doc = json.loads((out / "bench-simulated.json").read_text())
    assert doc["backend"] == "simulated" and len(doc["runs"]) == 2 * 2 * 3
    assert all(r["ok"] == r["requests"] > 0 for r in doc["runs"])
    assert (out / "bench-simulated.png").read_bytes()[:4] == b"\x89PNG"
    (out / "bench-simulated.md").unlink()
    assert main(["bench", "--simulate", "--report-only", "--output-dir", str(out)]) == 0
    assert "simulated by `ppd simulate`" in (out / "bench-simulated.md").read_text()
