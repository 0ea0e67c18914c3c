"""Roofline timing of prefill chunks, decode steps and KV moves: pure functions over specs.

Shared by the emulator (which sleeps for these times), the cost model (which predicts with them) and the cluster
simulator. Every time is in seconds of real GPU time; the emulator's `time_scale` is applied by the emulator alone.

FLOP counts (per forward, whole model):
- linear layers: 2 x params_non_embedding x new_tokens
- attention among the n new tokens (causal): 2 x layers x (heads x head_dim) x n^2
- attention of the n new tokens over a prefix of p cached tokens: 4 x layers x (heads x head_dim) x n x p
Each term is a roofline (the larger of its compute time and its memory time):
- linear: FLOPs at `linear_mfu`, but never faster than reading the weights once (a 16-token append is memory bound);
- prefix attention: FLOPs at `attn_prefix_mfu`, but never faster than the extend kernel can stream the prefix KV with
  the few CTAs a small append launches (`extend_prefix_bw_frac` of HBM bandwidth). This floor is what makes an m=16
  and an m=256 append over 16k cached tokens cost the same ~30 ms on H200 (NOTES.md), while m=2048 is FLOP bound.
- a decode step streams the weights once plus every running request's KV (or is FLOP bound at huge batches).
A batch of several requests in one extend forward shares the weight read and the launch overhead; their prefix
floors overlap (different CTAs), their FLOPs add.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ppd.specs import GpuSpec, KernelEfficiency, LinkSpec, ModelSpec

DEFAULT_EFFICIENCY = KernelEfficiency()


@dataclass(frozen=True)
class PrefillBreakdown:
    """Seconds spent in each term of one prefill (all chunks summed)."""

    linear_s: float
    attn_causal_s: float
    attn_prefix_s: float
    prefix_read_s: float
    overhead_s: float

    @property
    def total_s(self) -> float:
        return self.linear_s + self.attn_causal_s + self.attn_prefix_s + self.prefix_read_s + self.overhead_s


def kv_bytes(model: ModelSpec, tokens: int) -> int:
    return model.kv_bytes_per_token * max(0, tokens)


def linear_flops(model: ModelSpec, new_tokens: int) -> float:
    return 2.0 * model.params_non_embedding * new_tokens


def attn_causal_flops(model: ModelSpec, new_tokens: int) -> float:
    return 2.0 * model.layers * model.heads * model.head_dim * new_tokens * new_tokens


def attn_prefix_flops(model: ModelSpec, new_tokens: int, prefix_tokens: int) -> float:
    return 4.0 * model.layers * model.heads * model.head_dim * new_tokens * prefix_tokens


def extend_batch_breakdown(
    model: ModelSpec,
    gpu: GpuSpec,
    items: Sequence[tuple[int, int]],
    eff: KernelEfficiency = DEFAULT_EFFICIENCY,
) -> PrefillBreakdown:
    """One extend forward over several requests, each `(new_tokens, prefix_tokens)` (SGLang batches waiting prefills
    into one chunk). `prefix_read_s` is the part of the prefix floor not hidden under the prefix-attention FLOPs."""
    items = [(n, p) for n, p in items if n > 0]
    if not items:
        return PrefillBreakdown(0.0, 0.0, 0.0, 0.0, 0.0)
    new_total = sum(n for n, _ in items)
    linear_compute_s = linear_flops(model, new_total) / (gpu.flops * eff.linear_mfu)
    weights_read_s = model.weight_bytes / (gpu.hbm_bytes_per_s * eff.decode_bw_frac)
    causal_s = sum(attn_causal_flops(model, n) for n, _ in items) / (gpu.flops * eff.attn_causal_mfu)
    prefix_s = sum(attn_prefix_flops(model, n, p) for n, p in items) / (gpu.flops * eff.attn_prefix_mfu)
    floor_s = max(kv_bytes(model, p) for _, p in items) / (gpu.hbm_bytes_per_s * eff.extend_prefix_bw_frac)
    return PrefillBreakdown(
        linear_s=max(linear_compute_s, weights_read_s),
        attn_causal_s=causal_s,
        attn_prefix_s=prefix_s,
        prefix_read_s=max(0.0, floor_s - prefix_s),
        overhead_s=eff.prefill_overhead_ms / 1e3,
    )


def prefill_chunk_breakdown(
    model: ModelSpec,
    gpu: GpuSpec,
    new_tokens: int,
    prefix_tokens: int,
    eff: KernelEfficiency = DEFAULT_EFFICIENCY,
) -> PrefillBreakdown:
    """One forward that extends a sequence of `prefix_tokens` cached tokens by `new_tokens`."""
    return extend_batch_breakdown(model, gpu, [(new_tokens, prefix_tokens)], eff)


def chunk_sizes(new_tokens: int, chunk_size: int) -> list[int]:
    """How chunked prefill splits `new_tokens` (chunk_size <= 0 means one chunk)."""
    if new_tokens <= 0:
        return []
    if chunk_size <= 0 or new_tokens <= chunk_size:
        return [new_tokens]
    full, rest = divmod(new_tokens, chunk_size)
    return [chunk_size] * full + ([rest] if rest else [])


def prefill_breakdown(
    model: ModelSpec,
    gpu: GpuSpec,
    new_tokens: int,
    cached_tokens: int,
    chunk_size: int = 8192,
    eff: KernelEfficiency = DEFAULT_EFFICIENCY,
) -> PrefillBreakdown:
    """Prefill `new_tokens` on top of `cached_tokens`, chunked; each chunk attends to everything before it."""
    terms = [0.0] * 5
    prefix = cached_tokens
    for n in chunk_sizes(new_tokens, chunk_size):
        b = prefill_chunk_breakdown(model, gpu, n, prefix, eff)
        for i, v in enumerate((b.linear_s, b.attn_causal_s, b.attn_prefix_s, b.prefix_read_s, b.overhead_s)):
            terms[i] += v
        prefix += n
    return PrefillBreakdown(*terms)


def prefill_time_s(
    model: ModelSpec,
    gpu: GpuSpec,
    new_tokens: int,
    cached_tokens: int,
    chunk_size: int = 8192,
    eff: KernelEfficiency = DEFAULT_EFFICIENCY,
) -> float:
    return prefill_breakdown(model, gpu, new_tokens, cached_tokens, chunk_size, eff).total_s


def decode_step_time_s(
    model: ModelSpec,
    gpu: GpuSpec,
    batch_size: int,
    batch_kv_tokens: int,
    eff: KernelEfficiency = DEFAULT_EFFICIENCY,
) -> float:
    """One decode step for `batch_size` running requests holding `batch_kv_tokens` KV tokens in total.

    Memory term: weights once + all KV, at the decode kernels' achieved bandwidth. Compute term (large batches): linear
    FLOPs for one token per request. The step takes the larger of the two, plus a fixed per-step overhead.
    """
    if batch_size <= 0:
        return 0.0
    mem_s = (model.weight_bytes + kv_bytes(model, batch_kv_tokens)) / (gpu.hbm_bytes_per_s * eff.decode_bw_frac)
    compute_s = linear_flops(model, batch_size) / (gpu.flops * eff.linear_mfu)
    return max(mem_s, compute_s) + eff.decode_step_overhead_ms / 1e3


def transfer_time_s(link: LinkSpec, nbytes: int) -> float:
    """Moving `nbytes` of KV over `link`: fixed latency + bytes / effective bandwidth."""
    return link.latency_ms / 1e3 + max(0, nbytes) / link.bytes_per_s


def request_overhead_s(prompt_tokens: int, eff: KernelEfficiency = DEFAULT_EFFICIENCY) -> float:
    """Host-side cost of one request around the GPU work (HTTP, JSON of the token ids, scheduler hops)."""
    return (eff.request_overhead_ms + eff.per_token_overhead_us * prompt_tokens / 1e3) / 1e3


def kv_landing_time_s(model: ModelSpec, gpu: GpuSpec, tokens: int, eff: KernelEfficiency = DEFAULT_EFFICIENCY) -> float:
    """PD decode side: the stall a transferred request's KV puts on the decode GPU when it joins the running batch."""
    if tokens <= 0:
        return 0.0
    return eff.kv_landing_overhead_ms / 1e3 + kv_bytes(model, tokens) / (gpu.hbm_bytes_per_s * eff.kv_landing_bw_frac)
