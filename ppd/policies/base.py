"""The routing-policy contract: score each route for one request, explain the score, pick the cheaper.

Policies are pure over plain data (llm-d style filter -> score -> pick): the router gathers a `RoutingInput` (the
request's lengths on each side, each server's live load, the conversation's previous route) and a policy returns a
`Decision`. No I/O and no clocks in here, so policies are unit-testable and plottable.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol


class Route(str, enum.Enum):
    PREFILL = "prefill"  # P-route: prefill server computes, KV moves to the decode server (standard PD)
    DECODE = "decode"  # D-route: the decode server appends locally on top of its cached prefix (no KV move)
    COLOCATED = "colocated"  # a normal (non-disaggregated) server does both


@dataclass(frozen=True)
class ServerLoad:
    """Live state of one backend, from its /metrics and the router's own counters."""

    url: str
    gpu: str = "h200"
    healthy: bool = True
    running_reqs: int = 0  # sglang:num_running_reqs
    queued_reqs: int = 0  # sglang:num_queue_reqs
    inflight: int = 0  # requests the router has open to it
    running_kv_tokens: int = 0  # total context of running requests (sglang:num_used_tokens or router's estimate)
    token_usage: float = 0.0  # sglang:token_usage, 0..1
    max_inflight: int = 256  # admission limit; at or past it the server counts as saturated

    @property
    def saturated(self) -> bool:
        return self.inflight >= self.max_inflight


@dataclass(frozen=True)
class RoutingInput:
    """One request as the policy sees it. L and m are per side: the prefill server lacks the decode server's outputs."""

    prompt_tokens: int  # L + m: the whole prompt
    decode_cached_tokens: int  # L: prefix the decode server holds (router's index, corrected by backend reports)
    prefill_cached_tokens: int  # prefix the prefill server holds (its radix cache: earlier prompts, not outputs)
    max_new_tokens: int
    prefill: ServerLoad | None  # None when no prefill server is configured
    decode: ServerLoad
    previous_route: Route | None = None  # this conversation's last route (for stickiness)

    @property
    def append_len(self) -> int:
        """m: tokens the decode server would have to prefill on the D-route."""
        return max(0, self.prompt_tokens - self.decode_cached_tokens)

    @property
    def prefill_uncached_len(self) -> int:
        """Tokens the prefill server would compute on the P-route."""
        return max(0, self.prompt_tokens - self.prefill_cached_tokens)

    @property
    def cache_rate(self) -> float:
        """r = L / (L + m), on the decode server."""
        return self.decode_cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(frozen=True)
class RouteScore:
    route: Route
    cost_ms: float  # lower is better; inf = not allowed
    terms: dict[str, float] = field(default_factory=dict)  # named parts of cost_ms, for explanations and plots


@dataclass(frozen=True)
class Decision:
    route: Route
    policy: str
    reason: str  # short, low-cardinality label for metrics (e.g. "cheaper", "fixed", "prefill-unhealthy")
    cache_rate: float
    scores: tuple[RouteScore, ...] = ()
    detail: str = ""  # human-readable explanation for logs

    def explain(self) -> str:
        parts = [
            f"route={self.route.value}",
            f"policy={self.policy}",
            f"reason={self.reason}",
            f"r={self.cache_rate:.3f}",
        ]
        for s in self.scores:
            terms = ",".join(f"{k}={v:.1f}" for k, v in s.terms.items())
            parts.append(f"{s.route.value}={s.cost_ms:.1f}ms[{terms}]")
        if self.detail:
            parts.append(self.detail)
        return " ".join(parts)


@dataclass(frozen=True)
class PolicyContext:
    """What a policy factory gets besides its own params: the deployment's hardware, model and link by name."""

    model: str = "llama-3-8b"  # ppd.specs.MODELS
    prefill_gpu: str = "h200"  # ppd.specs.GPUS
    decode_gpu: str = "h200"
    link: str = "nvlink"  # ppd.specs.LINKS
    link_gbytes_per_s: float | None = None  # override of the link's bandwidth
    chunk_size: int = 8192


class Policy(Protocol):
    name: str

    def score(self, x: RoutingInput) -> tuple[RouteScore, ...]:
        """Cost of each route that is possible for this request."""
        ...

    def decide(self, x: RoutingInput) -> Decision:
        """Pick a route and say why."""
        ...


def availability_fallback(x: RoutingInput, policy: str) -> Decision | None:
    """Shared guard: when only one route can run, take it (every policy uses this before its own rule)."""
    p_ok = x.prefill is not None and x.prefill.healthy and not x.prefill.saturated
    if not p_ok:
        reason = (
            "no-prefill"
            if x.prefill is None
            else ("prefill-unhealthy" if not x.prefill.healthy else "prefill-saturated")
        )
        return Decision(Route.DECODE, policy, reason, x.cache_rate)
    return None


@dataclass(frozen=True)
class Observation:
    """What the router measured for one finished request; policies with an `observe` hook calibrate from these."""

    route: Route
    prompt_tokens: int
    decode_cached_tokens: int  # L on the decode server when routed
    prefill_cached_tokens: int  # cached on the prefill server (its meta_info.cached_tokens on the P-route)
    completion_tokens: int
    ttft_ms: float
    tpot_ms: float | None
    e2e_ms: float
    kv_bytes: int  # KV moved prefill -> decode (0 on the D-route)
    decode_running_reqs: int  # decode server load when the request was routed
    decode_running_kv_tokens: int
    prefill_queued_reqs: int
    server_timings: dict[str, float] = field(default_factory=dict)  # backend-reported ms (e.g. prefill_ms, transfer_ms)
