"""Workload generators, the JSONL trace format, and the simulator's KV cache model."""

from __future__ import annotations

import json

import pytest
import simpy

from ppd.simulate.cluster import ClusterSpec, simulate
from ppd.simulate.kvcache import KvPool
from ppd.simulate.trace import TraceError, TraceRequest, conversations, read_trace, write_trace
from ppd.simulate.workload import WORKLOADS, generate, with_overrides, workload


def test_generation_is_seeded_and_shares_conversations_across_rates():
    spec = WORKLOADS["chat"]
    a = generate(spec, rate=10, duration_s=300, seed=3)
    assert a == generate(spec, rate=10, duration_s=300, seed=3)
    assert a != generate(spec, rate=10, duration_s=300, seed=4)
    # common random numbers: at twice the rate the same conversations start twice as densely (from -warm_start_s)
    b = generate(spec, rate=20, duration_s=300, seed=3)
    warm = spec.warm_start_s()
    conv_a, conv_b = conversations(a), conversations(b)
    common = [c for c in conv_a if c in conv_b and conv_a[c][0].turn == 0 and conv_b[c][0].turn == 0]
    assert len(common) > 20
    for cid in common:
        ta, tb = conv_a[cid], conv_b[cid]
        n = min(len(ta), len(tb))
        assert [(t.prompt_tokens, t.output_tokens) for t in ta[:n]] == [
            (t.prompt_tokens, t.output_tokens) for t in tb[:n]
        ]
        assert tb[0].arrival_s + warm == pytest.approx((ta[0].arrival_s + warm) / 2)


def test_warm_start_makes_the_request_rate_stationary():
    """Conversations already under way at time 0: as many requests in the first 20 s as in any later 20 s."""
    trace = generate(WORKLOADS["chat"], rate=50, duration_s=120, seed=0)
    counts = [sum(1 for r in trace if 20 * i <= r.arrival_s < 20 * (i + 1)) for i in range(6)]
    assert min(counts) > 0.85 * max(counts)
    assert any(
        r.turn > 0 and r == min((x for x in trace if x.conversation_id == r.conversation_id), key=lambda x: x.turn)
        for r in trace
    )


@pytest.mark.parametrize("name", ["chat", "rag", "long-output"])
def test_presets_hit_their_request_rate_and_extend_history(name):
    spec = WORKLOADS[name]
    trace = generate(spec, rate=20, duration_s=400, seed=0)
    assert len(trace) / 400 == pytest.approx(20, rel=0.12)
    for turns in conversations(trace).values():
        for prev, cur in zip(turns, turns[1:], strict=False):
            assert cur.prompt_tokens > prev.prompt_tokens + prev.output_tokens  # history + a new message


def test_overrides():
    spec = with_overrides(workload("chat"), ["output.a=900", "mean_turns=2", "context.kind=const", "context.a=5000"])
    assert spec.output.a == 900 and spec.mean_turns == 2 and spec.context.a == 5000
    with pytest.raises(ValueError):
        with_overrides(spec, ["nope=1"])
    with pytest.raises(KeyError):
        workload("nope")


def test_trace_roundtrip_and_errors(tmp_path):
    trace = generate(WORKLOADS["rag"], rate=5, duration_s=20, seed=1)
    path = write_trace(trace, tmp_path / "t.jsonl")
    assert read_trace(path) == sorted(trace, key=lambda r: (r.arrival_s, r.conversation_id, r.turn))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"arrival_s": 0, "prompt_tokens": 10, "output_tokens": 5, "conversation_id": "a"}) + "\n")
    bad.write_text(bad.read_text() + json.dumps({"arrival_s": 0, "prompt_tokens": "x", "conversation_id": "b"}) + "\n")
    with pytest.raises(TraceError, match=r"bad.jsonl:2: .*prompt_tokens"):
        read_trace(bad)
    with pytest.raises(TraceError, match="no such trace"):
        read_trace(tmp_path / "missing.jsonl")


def test_shared_documents_are_cached_across_conversations():
    """Two conversations over the same document: the second one's prefill reuses the document's KV."""
    doc = 6000
    trace = [
        TraceRequest(0.0, doc + 50, 20, "a", prefix_id="doc", prefix_tokens=doc),
        TraceRequest(5.0, doc + 80, 20, "b", prefix_id="doc", prefix_tokens=doc),
    ]
    res = simulate(trace, ClusterSpec(colocated=1))
    a, b = sorted(res.requests, key=lambda r: r.issue_s)
    assert a.cached_tokens == 0 and b.cached_tokens == doc
    assert b.first_token_s - b.issue_s < a.first_token_s - a.issue_s


def test_pool_evicts_lru_unlocked_leaves_and_admits_fifo():
    env = simpy.Environment()
    pool = KvPool(env, capacity_tokens=1000)
    pool.tree.insert([("a", 400)])
    pool.tree.insert([("b", 300)])
    used, path = pool.lock_prefix([("a", 400)], limit_tokens=999)  # a is in use: never evicted
    assert used == 400
    first = pool.reserve(500)  # needs b evicted (free 300 + b 300)
    second = pool.reserve(200)  # waits behind the first: only 100 left
    env.run()
    assert first.triggered and not second.triggered
    assert pool.match([("a", 400)]) == 400 and pool.match([("b", 300)]) == 0
    pool.release(500)
    env.run()
    assert second.triggered
    pool.unlock(path)
    assert pool.reserve(2000) is None  # can never fit
    assert pool.stats(1.0)["peak_used_tokens"] <= 1000
