"""The P:D recommendation follows the workload: longer answers -> more decode GPUs, longer prompts -> more prefill.

Small, fast setting: 4 GPUs, a 64k-token KV pool per GPU (so decode saturates at a few dozen requests and the rate
search stays cheap), fixed lengths at evenly spaced arrivals, short rate searches.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from experiments.metrics import Slo
from ppd.simulate.cluster import ClusterSpec
from ppd.simulate.recommend import recommend_ratio
from ppd.simulate.workload import WORKLOADS, const

SLO = Slo(ttft_ms=1000, tpot_ms=50)
CLUSTER = ClusterSpec(kv_capacity_tokens=65536)
FAST = dict(include_colocated=False, search_requests=200, min_duration_s=5, rel_tol=0.15)


def fixed(prompt: int, output: int):
    return replace(WORKLOADS["fixed"], rate=8.0, duration_s=60, first_user=const(prompt), output=const(output))


def prefill_gpus(prompt: int, output: int) -> int:
    rec = recommend_ratio(fixed(prompt, output), 4, SLO, cluster=CLUSTER, **FAST)
    assert rec.best.max_rate_rps and rec.best.max_rate_rps > 0
    return rec.best.spec.prefill


def test_longer_outputs_move_toward_decode():
    short, long_ = prefill_gpus(1024, 32), prefill_gpus(1024, 512)
    assert long_ < short


def test_longer_prompts_move_toward_prefill():
    short, long_ = prefill_gpus(512, 256), prefill_gpus(4096, 256)
    assert long_ > short


def test_recommendation_explains_itself_and_considers_colocated():
    wl = fixed(4096, 64)
    rec = recommend_ratio(wl, 2, SLO, rate=4.0, cluster=CLUSTER, search_requests=100, min_duration_s=5, rel_tol=0.2)
    assert {c.ratio for c in rec.candidates} == {"0:2", "1:1"}
    assert rec.ratio in {"0:2", "1:1"}
    text = rec.explain()
    assert "recommended " + rec.ratio in text and "past that rate" in text
    d = rec.to_dict()
    assert d["recommended"] == rec.ratio and len(d["candidates"]) == 2
    assert "| 0:2 |" in rec.to_markdown()


def test_bad_budget_is_rejected():
    with pytest.raises(ValueError):
        recommend_ratio(fixed(128, 16), 0, SLO)
