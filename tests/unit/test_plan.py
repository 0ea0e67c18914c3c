"""`ppd plan`: KV memory formula, sizing arithmetic, CLI output."""

from __future__ import annotations

import json
import math

import pytest

from ppd.cli import main
from ppd.plan import PlanInput, kv_pool_tokens, plan, weights_bytes
from ppd.specs import gpu, model


def test_kv_formula_and_weights():
    m = model("llama-3-8b")
    assert m.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072  # 128 KiB
    assert weights_bytes(m) / 1e9 == pytest.approx(16.06, rel=0.01)  # 8.03 B parameters in bf16
    # Phi-3-mini has no GQA: 2 x 32 x 32 x 96 x 2 = 384 KiB per token
    assert model("phi-3-mini").kv_bytes_per_token == 384 * 1024


def test_kv_pool_matches_sglang_on_h200():
    """SGLang 0.5.10.post1 on H200 at mem_fraction_static 0.8 reported a 788,603-token pool (NOTES.md)."""
    assert kv_pool_tokens(model("llama-3-8b"), gpu("h200"), 0.8) == pytest.approx(788_603, rel=0.01)


def test_sizing_arithmetic():
    p = plan(PlanInput(model="llama-3-8b", gpu="h200", context=16384, users=50))
    assert p.kv_gib_per_user == pytest.approx(2.0)
    assert p.sequences_per_gpu == p.kv_pool_tokens // 16384
    assert p.users_limited_by == "kv-memory"
    assert p.max_users_per_decode_gpu == p.sequences_per_gpu
    assert p.decode_gpus == math.ceil(50 / p.max_users_per_decode_gpu)
    assert p.prefill_gpus >= 1
    assert p.ttft_cold_ms > p.ttft_append_prefill_route_ms > p.ttft_append_decode_route_ms  # idle: D wins
    assert 0 < p.tpot_ms < 50
    expected_rate = 50 / (30 + (p.ttft_append_prefill_route_ms + 256 * p.tpot_ms) / 1e3)
    assert p.turn_rate_per_s == pytest.approx(expected_rate)


def test_tpot_target_can_be_the_limit():
    p = plan(PlanInput(context=2048, users=400, tpot_target_ms=12.0))
    assert p.users_limited_by == "tpot-target"
    assert p.tpot_ms <= 12.0
    assert p.decode_gpus == math.ceil(400 / p.max_users_per_decode_gpu)


def test_more_users_never_need_fewer_gpus():
    sizes = [plan(PlanInput(context=8192, users=u)) for u in (10, 100, 500, 2000)]
    assert [s.decode_gpus for s in sizes] == sorted(s.decode_gpus for s in sizes)
    assert [s.prefill_gpus for s in sizes] == sorted(s.prefill_gpus for s in sizes)
    assert sizes[-1].total_gpus > sizes[0].total_gpus


def test_bad_input():
    with pytest.raises(ValueError):
        plan(PlanInput(context=10**7))
    with pytest.raises(KeyError):
        plan(PlanInput(gpu="h9000"))


def test_cli_table_and_json(capsys):
    assert main(["plan", "--model", "llama-3-8b", "--gpu", "h200", "--context", "16384", "--users", "50"]) == 0
    table = capsys.readouterr().out
    assert "128 KiB" in table and "GPUs for 50 users" in table
    assert main(["plan", "--gpu", "h20", "--prefill-gpu", "h200", "--context", "4096", "--users", "50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv_bytes_per_token"] == 131072
    assert out["input"]["gpu"] == "h20" and out["total_gpus"] == out["decode_gpus"] + out["prefill_gpus"]
    assert main(["plan", "--gpu", "nope"]) == 2
    assert "unknown GPU" in capsys.readouterr().err


def test_plan_workload_needs_gpus(capsys):
    from ppd.cli import main

    assert main(["plan", "--workload", "chat"]) == 2
    assert "--workload and --gpus go together" in capsys.readouterr().err


def test_plan_recommends_a_ratio_with_reasoning(capsys):
    """`ppd plan --workload ... --gpus N` goes through the cluster simulator and names a P:D split (0:N = colocated)."""
    from ppd.cli import main

    assert main(["plan", "--workload", "rag", "--gpus", "2", "--policy", "prefill", "--rate", "4", "--json"]) == 0
    import json

    rec = json.loads(capsys.readouterr().out)
    text = json.dumps(rec)
    assert any(r in text for r in ('"0:2"', '"1:1"')), text[:500]
