"""The roofline's shape: what the emulator sleeps and the cost model predicts."""

from __future__ import annotations

import dataclasses

import pytest

from ppd import roofline, specs

M = specs.model("llama-3-8b")
H200 = specs.gpu("h200")
EFF = specs.KernelEfficiency()


def test_kv_bytes_formula():
    # 2 (K and V) x layers x kv_heads x head_dim x bf16 bytes = 128 KiB per Llama-3-8B token
    assert M.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    assert roofline.kv_bytes(M, 16384) == 16384 * 131072
    assert roofline.kv_bytes(M, -5) == 0


def test_prefill_is_super_linear_in_context_at_large_l():
    t8k = roofline.prefill_time_s(M, H200, 8192, 0)
    t32k = roofline.prefill_time_s(M, H200, 32768, 0)
    t64k = roofline.prefill_time_s(M, H200, 65536, 0)
    # linear would be 4x and 2x; attention over the earlier chunks grows with L^2
    assert t32k > 1.5 * 4 * t8k
    assert t64k > 1.5 * 2 * t32k


def test_chunking_adds_prefix_attention_not_flops():
    one = roofline.prefill_breakdown(M, H200, 16384, 0, chunk_size=0)
    two = roofline.prefill_breakdown(M, H200, 16384, 0, chunk_size=8192)
    assert two.linear_s == pytest.approx(one.linear_s)
    assert two.attn_causal_s < one.attn_causal_s  # the second chunk's causal part became prefix attention
    assert two.attn_prefix_s > 0 == one.attn_prefix_s
    assert roofline.chunk_sizes(20000, 8192) == [8192, 8192, 3616]


def test_small_append_over_long_prefix_is_bounded_by_the_prefix_read():
    # NOTES.md: m=16 and m=256 over 16k cached cost the same ~31 ms on H200; m=2048 is FLOP bound (~170 ms)
    t16 = roofline.prefill_time_s(M, H200, 16, 16384)
    t256 = roofline.prefill_time_s(M, H200, 256, 16384)
    t2048 = roofline.prefill_time_s(M, H200, 2048, 16384)
    assert t16 == pytest.approx(t256, rel=0.05)
    assert 0.025 < t16 < 0.040
    assert t2048 > 4 * t256
    # and the floor scales with the prefix
    assert roofline.prefill_time_s(M, H200, 16, 4096) < 0.5 * t16


def test_linear_term_never_beats_reading_the_weights():
    b = roofline.prefill_chunk_breakdown(M, H200, 1, 0)
    assert b.linear_s == pytest.approx(M.weight_bytes / (H200.hbm_bytes_per_s * EFF.decode_bw_frac))


def test_extend_batch_shares_weights_and_overhead():
    a = roofline.prefill_chunk_breakdown(M, H200, 16, 2048)
    batch = roofline.extend_batch_breakdown(M, H200, [(16, 2048), (16, 2048)])
    assert batch.total_s < 2 * a.total_s
    assert batch.overhead_s == a.overhead_s
    assert roofline.extend_batch_breakdown(M, H200, []).total_s == 0.0


def test_decode_step_grows_with_batch_kv():
    small = roofline.decode_step_time_s(M, H200, 32, 32 * 512)
    big = roofline.decode_step_time_s(M, H200, 32, 32 * 8192)
    assert big > small
    extra_bytes = roofline.kv_bytes(M, 32 * (8192 - 512))
    assert big - small == pytest.approx(extra_bytes / (H200.hbm_bytes_per_s * EFF.decode_bw_frac))
    # 32 streams of ~2k tokens: NOTES.md saw 7.6-8.6 ms per token on H200
    assert 0.0065 < roofline.decode_step_time_s(M, H200, 32, 32 * 2200) < 0.0095
    assert roofline.decode_step_time_s(M, H200, 0, 0) == 0.0


def test_slower_gpu_is_slower():
    h100, a100 = specs.gpu("h100"), specs.gpu("a100")
    assert roofline.decode_step_time_s(M, h100, 8, 8000) > roofline.decode_step_time_s(M, H200, 8, 8000)
    assert roofline.prefill_time_s(M, a100, 4096, 0) > roofline.prefill_time_s(M, H200, 4096, 0)


def test_transfer_time_is_latency_plus_bytes_over_bandwidth():
    link = specs.link("rdma-100g")
    nbytes = roofline.kv_bytes(M, 16384)
    assert roofline.transfer_time_s(link, nbytes) == pytest.approx(link.latency_ms / 1e3 + nbytes / 12.5e9)
    assert roofline.transfer_time_s(link, 0) == pytest.approx(link.latency_ms / 1e3)


def test_kv_landing_stall():
    assert roofline.kv_landing_time_s(M, H200, 0) == 0.0
    t = roofline.kv_landing_time_s(M, H200, 16384)
    assert t == pytest.approx(
        EFF.kv_landing_overhead_ms / 1e3 + roofline.kv_bytes(M, 16384) / (H200.hbm_bytes_per_s * EFF.kv_landing_bw_frac)
    )


def test_efficiency_is_plain_frozen_data():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EFF.linear_mfu = 1.0  # type: ignore[misc]
    faster = dataclasses.replace(EFF, attn_prefix_mfu=EFF.attn_prefix_mfu * 2)
    assert roofline.prefill_time_s(M, H200, 2048, 16384, eff=faster) < roofline.prefill_time_s(M, H200, 2048, 16384)
