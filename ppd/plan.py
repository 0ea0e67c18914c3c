"""`ppd plan`: KV memory and GPU sizing for a model, GPU, context length and user count (pure; the CLI is plan_cli).

KV per token = 2 (K and V) x layers x kv_heads x head_dim x bytes (Llama-3-8B bf16: 2 x 32 x 8 x 128 x 2 = 128 KiB).
KV pool per GPU = memory x mem_fraction_static - weights - reserve (SGLang's static budget holds weights and the KV
pool; the reserve is what else it keeps there). On H200 with Llama-3-8B at 0.8 this gives 789k tokens; SGLang
0.5.10.post1 reported 788,603 (../shared/gpu/NOTES.md).

Load model (stated so that it can be argued with): each of `users` conversations holds `context` tokens of KV on a
decode GPU (the worst case: every user at full context), and loops think -> append-prefill -> answer. A decode GPU
serves as many users as fit in its KV pool, as its scheduler admits, and as keep the decode step under the TPOT
target. A prefill GPU on the P-route computes each turn's new message plus the previous answer (the prefill server
never saw it) on top of the cached rest; prefill GPUs are sized to stay under a target utilisation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ppd import roofline
from ppd.costmodel import CostParams, predict_decode_route, predict_prefill_route, synthetic_input
from ppd.specs import GpuSpec, ModelSpec, gpu, link, model

GIB = 1024**3


@dataclass(frozen=True)
class PlanInput:
    model: str = field(default="llama-3-8b", metadata={"help": "ppd.specs model name"})
    gpu: str = field(default="h200", metadata={"help": "decode GPU (ppd.specs name: h200, h100, a100, h20)"})
    context: int = field(default=16384, metadata={"help": "tokens of KV each user holds on the decode GPU"})
    users: int = field(default=50, metadata={"help": "concurrent conversations to serve"})
    prefill_gpu: str | None = field(default=None, metadata={"help": "prefill GPU; defaults to --gpu"})
    link: str = field(default="nvlink", metadata={"help": "KV link class (ppd.specs.LINKS)"})
    mem_fraction_static: float = field(default=0.8, metadata={"help": "SGLang --mem-fraction-static"})
    reserve_gib: float = field(
        default=1.5,
        metadata={"help": "GiB of the static budget used besides weights and KV"},
    )
    max_running_requests: int = field(default=256, metadata={"help": "the decode scheduler's admission limit"})
    append_tokens: int = field(default=512, metadata={"help": "new tokens per user turn (m)"})
    output_tokens: int = field(default=256, metadata={"help": "tokens per answer"})
    think_time_s: float = field(default=30.0, metadata={"help": "user pause between an answer and the next turn"})
    tpot_target_ms: float = field(default=50.0, metadata={"help": "decode step time a user may see, ms"})
    prefill_utilization: float = field(
        default=0.7, metadata={"help": "keep prefill GPUs below this busy fraction (queueing grows past it)"}
    )
    chunk_size: int = field(default=8192, metadata={"help": "chunked prefill size, tokens"})


@dataclass(frozen=True)
class Plan:
    input: PlanInput
    kv_bytes_per_token: int
    kv_gib_per_user: float
    weights_gib: float
    kv_pool_gib: float
    kv_pool_tokens: int
    sequences_per_gpu: int  # sequences of `context` tokens that fit in one decode GPU's KV pool
    max_users_per_decode_gpu: int  # min(KV fit, admission limit, TPOT target)
    users_limited_by: str  # "kv-memory" | "max-running-requests" | "tpot-target"
    tpot_ms: float  # decode step at the users each decode GPU actually gets
    ttft_cold_ms: float  # a fresh `context`-token prompt via the P-route (prefill + KV move), idle servers
    ttft_append_prefill_route_ms: float  # one turn's append via the P-route, idle servers
    ttft_append_decode_route_ms: float  # the same append done on the decode GPU
    turn_rate_per_s: float  # turns/s the whole user population sends
    prefill_gpu_s_per_turn: float  # P-route prefill GPU time per turn
    decode_append_busy_frac: float  # share of each decode GPU's time appends would take if all were D-routed
    decode_gpus: int
    prefill_gpus: int

    @property
    def total_gpus(self) -> int:
        return self.decode_gpus + self.prefill_gpus

    def to_dict(self) -> dict:
        out = asdict(self)
        out["total_gpus"] = self.total_gpus
        return out


def weights_bytes(m: ModelSpec) -> int:
    """Every parameter resident (embedding and LM head included)."""
    return m.params_total * m.dtype_bytes


def kv_pool_tokens(m: ModelSpec, g: GpuSpec, mem_fraction_static: float = 0.8, reserve_gib: float = 1.5) -> int:
    """KV tokens one GPU holds: its static budget minus weights and reserve, over the bytes per token (>= 0)."""
    pool = g.hbm_gib * GIB * mem_fraction_static - weights_bytes(m) - reserve_gib * GIB
    return max(0, int(pool // m.kv_bytes_per_token))


def _tpot_ms(m: ModelSpec, g: GpuSpec, users: int, context: int) -> float:
    return 1e3 * roofline.decode_step_time_s(m, g, users, users * context)


def _max_users_at_tpot(m: ModelSpec, g: GpuSpec, context: int, target_ms: float, cap: int) -> int:
    """Largest batch whose decode step stays within the TPOT target (step time grows with the batch)."""
    lo, hi = 0, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _tpot_ms(m, g, mid, context) <= target_ms:
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan(p: PlanInput) -> Plan:
    ms, dg = model(p.model), gpu(p.gpu)
    pg = gpu(p.prefill_gpu or p.gpu)
    if p.context <= 0 or p.users <= 0:
        raise ValueError("context and users must be positive")
    if p.context > ms.max_context:
        raise ValueError(f"context {p.context} exceeds {ms.name}'s max_context {ms.max_context}")
    pool_tokens = kv_pool_tokens(ms, dg, p.mem_fraction_static, p.reserve_gib)
    fit_kv = pool_tokens // p.context
    limits = {
        "kv-memory": fit_kv,
        "max-running-requests": p.max_running_requests,
        "tpot-target": _max_users_at_tpot(ms, dg, p.context, p.tpot_target_ms, max(fit_kv, 1)),
    }
    limited_by = min(limits, key=lambda k: limits[k])
    per_gpu = limits[limited_by]
    decode_gpus = math.ceil(p.users / per_gpu) if per_gpu > 0 else 0
    users_per_gpu = math.ceil(p.users / decode_gpus) if decode_gpus else 0
    tpot = _tpot_ms(ms, dg, max(users_per_gpu, 1), p.context)

    params = CostParams.from_specs(ms, pg, dg, link(p.link), chunk_size=p.chunk_size)
    append = min(p.append_tokens, p.context - 1)
    cold = predict_prefill_route(synthetic_input(0, p.context, prefill_cached_tokens=0), params)
    # one turn: L = context - append cached on D; P lacks the previous answer too
    turn = synthetic_input(
        p.context - append, append, prefill_cached_tokens=max(0, p.context - append - p.output_tokens)
    )
    turn_p = predict_prefill_route(turn, params)
    turn_d = predict_decode_route(turn, params)
    cycle_s = p.think_time_s + (turn_p.ttft_ms + p.output_tokens * tpot) / 1e3
    rate = p.users / cycle_s
    prefill_s = turn_p.terms["prefill_ms"] / 1e3
    prefill_gpus = math.ceil(rate * prefill_s / p.prefill_utilization) if decode_gpus else 0
    append_busy = (rate / decode_gpus) * turn_d.terms["prefill_ms"] / 1e3 if decode_gpus else 0.0
    return Plan(
        input=p,
        kv_bytes_per_token=ms.kv_bytes_per_token,
        kv_gib_per_user=ms.kv_bytes_per_token * p.context / GIB,
        weights_gib=weights_bytes(ms) / GIB,
        kv_pool_gib=pool_tokens * ms.kv_bytes_per_token / GIB,
        kv_pool_tokens=pool_tokens,
        sequences_per_gpu=fit_kv,
        max_users_per_decode_gpu=per_gpu,
        users_limited_by=limited_by,
        tpot_ms=tpot,
        ttft_cold_ms=cold.ttft_ms,
        ttft_append_prefill_route_ms=turn_p.ttft_ms,
        ttft_append_decode_route_ms=turn_d.ttft_ms,
        turn_rate_per_s=rate,
        prefill_gpu_s_per_turn=prefill_s,
        decode_append_busy_frac=append_busy,
        decode_gpus=decode_gpus,
        prefill_gpus=prefill_gpus,
    )


def format_table(pl: Plan) -> str:
    """Human-readable sizing table."""
    p = pl.input
    rows = [
        ("model / decode GPU / prefill GPU / link", f"{p.model} / {p.gpu} / {p.prefill_gpu or p.gpu} / {p.link}"),
        ("KV per token", f"{pl.kv_bytes_per_token / 1024:.0f} KiB"),
        (f"KV per user at {p.context} tokens", f"{pl.kv_gib_per_user:.2f} GiB"),
        ("weights", f"{pl.weights_gib:.1f} GiB"),
        (f"KV pool per GPU (mem_fraction_static {p.mem_fraction_static})", f"{pl.kv_pool_gib:.1f} GiB = {pl.kv_pool_tokens:,} tokens"),
        (f"sequences of {p.context} tokens per GPU", f"{pl.sequences_per_gpu}"),
        ("max concurrent users per decode GPU", f"{pl.max_users_per_decode_gpu} (limited by {pl.users_limited_by})"),
        (f"TPOT at {math.ceil(p.users / max(pl.decode_gpus, 1))} users/GPU", f"{pl.tpot_ms:.1f} ms (target {p.tpot_target_ms:g})"),
        (f"TTFT, fresh {p.context}-token prompt (P-route, idle)", f"{pl.ttft_cold_ms:.0f} ms"),
        (f"TTFT, {min(p.append_tokens, p.context - 1)}-token append: P-route / D-route (idle)",
         f"{pl.ttft_append_prefill_route_ms:.0f} / {pl.ttft_append_decode_route_ms:.0f} ms"),
        (f"turn rate ({p.users} users, {p.think_time_s:g} s think, {p.output_tokens}-token answers)", f"{pl.turn_rate_per_s:.2f} /s"),
        ("prefill GPU time per turn (P-route)", f"{pl.prefill_gpu_s_per_turn * 1e3:.1f} ms"),
        ("decode GPU busy with appends if all D-routed", f"{100 * pl.decode_append_busy_frac:.1f} %"),
        (f"GPUs for {p.users} users", f"{pl.decode_gpus} decode + {pl.prefill_gpus} prefill = {pl.total_gpus}"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
