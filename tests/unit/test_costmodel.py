"""Cost model: hand-computed cases, monotonicity, and the direction the P/D crossover moves with load, GPU and link."""

from __future__ import annotations

import dataclasses

import pytest

from ppd.costmodel import (
    CostParams,
    exposed_transfer_s,
    kv_chunk_bytes,
    predict_decode_route,
    predict_prefill_route,
    route_costs,
    synthetic_input,
)
from ppd.policies.base import PolicyContext, Route, RoutingInput, ServerLoad
from ppd.roofline import DEFAULT_EFFICIENCY as EFF
from ppd.specs import gpu, link, model

LLAMA = model("llama-3-8b")
M_GRID = [1, 4, 16, 64, 256, 1024, 2048]
L_GRID = [512, 2048, 8192, 16384]


def params(pair: str = "h200-h200", link_name: str = "nvlink", **kw) -> CostParams:
    p, d = pair.split("-")
    return CostParams.from_specs(LLAMA, gpu(p), gpu(d), link(link_name), **kw)


def p_share(prm: CostParams, streams: int) -> float:
    """Fraction of the m x L grid where the P-route is cheaper."""
    wins = [
        route_costs(synthetic_input(L, m, background_streams=streams), prm)[0].cost_ms
        < route_costs(synthetic_input(L, m, background_streams=streams), prm)[1].cost_ms
        for L in L_GRID
        for m in M_GRID
    ]
    return sum(wins) / len(wins)


def hand_prefill_ms(g, new: int, prefix: int) -> float:
    """One chunk of Llama-3-8B by the formulas in ppd/roofline.py's docstring, written out (each term: the larger of
    its FLOP time and its byte floor)."""
    params_per_layer = 4096 * (4096 + 2 * 8 * 128) + 4096 * 4096 + 3 * 4096 * 14336
    flops, hbm = g.bf16_tflops * 1e12, g.hbm_tbps * 1e12
    weights = (32 * params_per_layer + 128256 * 4096) * 2
    linear = max(2 * 32 * params_per_layer * new / (flops * EFF.linear_mfu), weights / (hbm * EFF.decode_bw_frac))
    causal = 2 * 32 * 4096 * new * new / (flops * EFF.attn_causal_mfu)
    prefix_attn = 4 * 32 * 4096 * new * prefix / (flops * EFF.attn_prefix_mfu)
    floor = prefix * 131072 / (hbm * EFF.extend_prefix_bw_frac)
    return 1e3 * (linear + causal + max(prefix_attn, floor)) + EFF.prefill_overhead_ms


def test_kv_bytes_per_token_llama3_8b_is_128_kib():
    assert LLAMA.kv_bytes_per_token == 128 * 1024


def test_idle_decode_route_hand_computed():
    L, m = 1024, 512
    d = predict_decode_route(synthetic_input(L, m), params())
    prefill = hand_prefill_ms(gpu("h200"), m, L)
    host = EFF.request_overhead_ms + EFF.per_token_overhead_us * (L + m) / 1e3
    assert d.terms["prefill_ms"] == pytest.approx(prefill, rel=1e-9)
    assert d.ttft_ms == pytest.approx(host + prefill, rel=1e-9)
    assert d.interference_ms == 0.0 and d.kv_bytes == 0


def test_idle_prefill_route_hand_computed():
    """One chunk: the whole prompt's KV moves after the prefill; P lacks 256 tokens of the prefix (an earlier answer)."""
    L, m = 4096, 512
    x = synthetic_input(L, m, prefill_cached_tokens=L - 256)
    p = predict_prefill_route(x, params(link_name="rdma-100g"))
    prefill = hand_prefill_ms(gpu("h200"), m + 256, L - 256)
    transfer = 2.0 + (L + m) * 131072 / 12.5e9 * 1e3  # latency + bytes / 12.5 GB/s
    host = EFF.request_overhead_ms + EFF.per_token_overhead_us * (L + m) / 1e3
    assert p.terms["prefill_ms"] == pytest.approx(prefill, rel=1e-9)
    assert p.terms["transfer_ms"] == pytest.approx(transfer, rel=1e-9)
    assert p.ttft_ms == pytest.approx(host + prefill + transfer, rel=1e-9)
    assert p.kv_bytes == (L + m) * 131072


def test_transfer_of_earlier_chunks_overlaps_later_compute():
    # two 10 ms chunks, 15 ms on the wire each: sends run 10-25 and 25-40, the last compute ends at 20
    assert exposed_transfer_s([0.010, 0.010], [15, 15], 1e3, 0.002) == pytest.approx(0.002 + 0.020)
    # a fast link leaves only the last chunk's send
    assert exposed_transfer_s([0.010, 0.010], [1, 1], 1e3, 0.0) == pytest.approx(0.001)
    # the first send carries the cached prefix
    assert kv_chunk_bytes(LLAMA, 10000, 3000, 8192) == [(3000 + 8192) * 131072, 1808 * 131072]


def test_prefill_route_grows_with_context_through_the_transfer():
    prm = params(link_name="tcp-25g")
    prev = None
    for L in [512, 1024, 4096, 16384, 32768]:
        p = predict_prefill_route(synthetic_input(L, 64), prm)
        if prev is not None:
            assert p.terms["transfer_ms"] > prev.terms["transfer_ms"]
            assert p.ttft_ms > prev.ttft_ms
        prev = p


def test_decode_route_grows_with_append_length():
    prm = params()
    costs = [predict_decode_route(synthetic_input(8192, m, background_streams=8), prm) for m in M_GRID]
    for a, b in zip(costs, costs[1:], strict=False):
        assert b.ttft_ms > a.ttft_ms and b.interference_ms > a.interference_ms


def test_interference_is_prefill_time_per_running_stream_weighted():
    x = synthetic_input(16384, 2048, background_streams=32)
    d1 = predict_decode_route(x, params())
    assert d1.interference_ms == pytest.approx(32 * d1.terms["prefill_ms"])
    d_half = predict_decode_route(x, params(interference_weight=0.5))
    assert d_half.interference_ms == pytest.approx(0.5 * d1.interference_ms)
    p = predict_prefill_route(x, params())
    landing_ms = EFF.kv_landing_overhead_ms + 1e3 * (16384 + 2048) * 131072 / (4.8e12 * EFF.kv_landing_bw_frac)
    assert p.interference_ms == pytest.approx(32 * landing_ms)
    assert p.interference_ms < d1.interference_ms / 5  # NOTES.md: P stalls the others far less at m=2048


def test_queue_wait_uses_service_estimate():
    prm = params()
    base = synthetic_input(2048, 256)
    busy = dataclasses.replace(base, prefill=ServerLoad(url="p", queued_reqs=3, running_reqs=1))
    own = predict_prefill_route(busy, prm).terms["prefill_ms"]
    assert predict_prefill_route(busy, prm).terms["queue_ms"] == pytest.approx(3.5 * own)
    fixed = prm.with_values(prefill_service_ms=100.0)
    assert predict_prefill_route(busy, fixed).terms["queue_ms"] == pytest.approx(350.0)
    # no metrics yet: the router's in-flight count stands in
    inflight = dataclasses.replace(base, prefill=ServerLoad(url="p", inflight=3))
    assert predict_prefill_route(inflight, fixed).terms["queue_ms"] == pytest.approx(250.0)


def test_decode_route_waits_for_the_running_step():
    prm = params()
    idle = predict_decode_route(synthetic_input(2048, 16), prm)
    busy = predict_decode_route(synthetic_input(2048, 16, background_streams=32), prm)
    assert idle.terms["wait_ms"] == 0.0
    assert busy.terms["wait_ms"] > 1.0


def test_idle_identical_gpus_decode_route_wins():
    """NOTES.md: on idle 2xH200 over NVLink the D-route wins by a few ms (82 vs 78 at L=16384, m=16)."""
    p, d = route_costs(synthetic_input(16384, 16), params())
    assert d.cost_ms < p.cost_ms < d.cost_ms + 20
    assert p_share(params(), 0) == 0.0


def test_crossover_moves_toward_prefill_as_decode_load_rises():
    prm = params(link_name="tcp-25g")
    shares = [p_share(prm, n) for n in (0, 8, 32, 128)]
    assert shares == sorted(shares)
    assert shares[0] < shares[1] < shares[-1]


def test_crossover_moves_toward_prefill_as_decode_gpu_gets_weaker():
    for n in (0, 8):
        assert p_share(params("h200-h20", "rdma-100g"), n) > p_share(params("h200-h200", "rdma-100g"), n)


def test_crossover_moves_toward_decode_as_link_gets_slower():
    shares = [p_share(params("h200-h20", lk), 0) for lk in ("nvlink", "rdma-400g", "rdma-100g", "tcp-25g")]
    assert shares == sorted(shares, reverse=True)
    assert shares[0] > shares[-1]
    loaded = [p_share(params("h200-h200", lk), 8) for lk in ("nvlink", "rdma-100g", "tcp-25g")]
    assert loaded[0] > loaded[-1]


def test_fully_cached_prompt_still_computes_one_token():
    x = RoutingInput(4096, 4096, 4096, 8, ServerLoad("p"), ServerLoad("d"))
    p, d = route_costs(x, params())
    assert p.terms["prefill_ms"] > 0 and d.terms["prefill_ms"] > 0


def test_context_link_override_and_unknown_parameter():
    prm = CostParams.from_context(PolicyContext(link="nvlink", link_gbytes_per_s=10.0))
    assert prm.link_bytes_per_s == 10e9
    with pytest.raises(ValueError, match="unknown cost-model parameter"):
        prm.with_values(flops=1.0)


def test_scores_carry_named_terms_that_sum_to_the_cost():
    p, d = route_costs(synthetic_input(8192, 512, background_streams=8), params())
    assert p.route is Route.PREFILL and d.route is Route.DECODE
    for s in (p, d):
        assert sum(s.terms.values()) == pytest.approx(s.cost_ms)
