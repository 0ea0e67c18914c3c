"""`ppd simulate` end to end: the files are produced and well-formed (not their numbers)."""

from __future__ import annotations

import json

from ppd.cli import main
from ppd.simulate.trace import read_trace


def test_sweep_writes_json_markdown_png_and_trace(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(
        ["simulate", "--sweep-ratios", "--gpus", "3", "--workload", "chat", "--rate", "3", "--duration", "20"]
        + ["--seed", "1", "--out-dir", str(out), "--quiet"]
    )
    assert rc == 0
    data = json.loads((out / "simulate.json").read_text())
    assert [r["ratio"] for r in data["results"]] == ["0:3", "1:2", "2:1"]
    for r in data["results"]:
        assert r["requests"] > 0 and 0 <= r["slo_attainment"] <= 1
        assert {"p50", "p99"} <= set(r["ttft_ms"]) and "bottleneck" in r and "kv" in r and "transfer" in r
    assert data["slo"] == {"ttft_ms": 500.0, "tpot_ms": 30.0}
    md = (out / "simulate.md").read_text()
    assert len([line for line in md.splitlines() if line.startswith("| ")]) == 4  # header + 3 rows
    assert (out / "simulate.png").read_bytes()[:4] == b"\x89PNG"
    trace = read_trace(out / "trace.jsonl")
    assert len(trace) == data["results"][0]["requests_simulated"] >= data["results"][0]["requests"]
    assert "| 0:3 |" in capsys.readouterr().out


def test_single_point_with_trace_input_and_requests_out(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        "".join(
            json.dumps({"arrival_s": i * 0.5, "prompt_tokens": 300, "output_tokens": 20, "conversation_id": f"c{i}"})
            + "\n"
            for i in range(6)
        )
    )
    rc = main(
        ["simulate", "--prefill", "1", "--decode", "2", "--workload", str(trace), "--policy", "decode"]
        + ["--json", str(tmp_path / "o.json"), "--requests-out", str(tmp_path / "r.jsonl"), "--quiet"]
    )
    assert rc == 0
    (row,) = json.loads((tmp_path / "o.json").read_text())["results"]
    assert row["ratio"] == "1:2" and row["requests"] == 6 and row["routes"] == {"decode": 6}
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["route"] == "decode"


def test_usage_errors_exit_2(capsys):
    assert main(["simulate", "--prefill", "1"]) == 2
    assert main(["simulate", "--sweep-ratios"]) == 2
    assert main(["simulate", "--colocated", "1", "--workload", "nope"]) == 2
    assert main(["simulate", "--colocated", "1", "--policy", "nope"]) == 2
    assert "unknown policy" in capsys.readouterr().err
