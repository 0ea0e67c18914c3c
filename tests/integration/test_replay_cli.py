"""A short `ppd replay` (synthetic multi-turn chat and a ShareGPT-style trace) against the embedded stack it starts
itself with --config: JSON, Markdown and PNG are produced and well-formed."""

import json

import pytest

from ppd.cli import main
from ppd.config import REPO_ROOT

pytestmark = pytest.mark.slow


def test_short_replay(tmp_path):
    for entry in ("ppd/emulator/__main__.py", "router/__main__.py"):
        if not (REPO_ROOT / entry).exists():
            pytest.skip(f"not written yet: {entry}")
    trace = tmp_path / "sharegpt.jsonl"
    trace.write_text(
        "\n".join(
            json.dumps(
                {
                    "id": f"t{i}",
                    "conversations": [
                        {"from": "human", "value": f"Question {i}: what is a radix tree?"},
                        {"from": "gpt", "value": "A tree keyed by prefixes."},
                        {"from": "human", "value": "And why does a router care?"},
                        {"from": "gpt", "value": "To find the cached prefix of a conversation."},
                    ],
                }
            )
            for i in range(2)
        )
    )
    out = tmp_path / "out"
    argv = [
        "replay",
        "--config",
        str(REPO_ROOT / "configs" / "local.yaml"),
        "--workload",
        "chat,sharegpt",
        "--trace",
        str(trace),
        "--conversations",
        "3",
        "--mean-turns",
        "2",
        "--think-mean-s",
        "0.1",
        "--max-output-tokens",
        "12",
        "--request-rate",
        "10",
        "--policies",
        "prefill,decode",
        "--slo-ttft-ms",
        "1000",
        "--slo-tpot-ms",
        "100",
        "--output-dir",
        str(out),
        "--no-progress",
        "--flush-caches",
    ]
    assert main(argv) == 0
    doc = json.loads((out / "replay.json").read_text())
    # --flush-caches: both servers emptied before each (scenario, policy)
    flushes = doc["config"]["cache_flushes"]
    assert len(flushes) == 4 and all(len(f["flushed"]) == 2 and all(f["flushed"].values()) for f in flushes)
    assert {"config", "start_time", "end_time", "scenarios", "requests"} <= set(doc)
    assert set(doc["scenarios"]) == {"chat", "sharegpt"}
    for scen, entry in doc["scenarios"].items():
        assert set(entry["policies"]) == {"prefill", "decode"}
        for policy, v in entry["policies"].items():
            assert v["ok"] == v["requests"] == entry["requests"], (scen, policy)
            assert v["goodput_rps"] is not None and v["goodput_rps"] >= 0
            assert v["ttft_p50_ms"] > 0 and v["ttft_p99_ms"] >= v["ttft_p50_ms"]
            assert v["route_share"] == {policy: 1.0}  # the x-ppd-policy header forced every turn's route
        assert (out / f"replay_{scen}.png").read_bytes()[:4] == b"\x89PNG"
    # later turns of a conversation find their history cached on the decode server
    later = [r for r in doc["requests"]["sharegpt"]["decode"] if r["turn"] > 0]
    assert later and all(r["cached_tokens"] and r["cached_tokens"] > 0 for r in later)
    md = (out / "replay.md").read_text()
    assert "goodput req/s" in md and "## sharegpt" in md
