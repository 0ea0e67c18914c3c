"""`threshold`: the Dynamo-style baseline. Remote prefill (P-route) only if the tokens to compute exceed N and the
prefill queue is shorter than Q; otherwise prefill locally on the decode server (D-route).

Dynamo's disaggregated router decides `prefill_length - prefix_hit_length > max_local_prefill_length and
queue_size < max_prefill_queue_size`, where the prefix hit is on the local (decode) worker: `uncached_on="decode"`
(the default) compares m, the tokens the decode server would compute; `uncached_on="prefill"` compares the tokens
the prefill server would compute (it lacks the earlier answers, so this is larger).
"""

from __future__ import annotations

from typing import Literal

from ppd.policies.base import Decision, PolicyContext, Route, RouteScore, RoutingInput, availability_fallback


class ThresholdPolicy:
    name = "threshold"

    def __init__(
        self,
        context: PolicyContext | None = None,
        *,
        min_uncached_tokens: int = 512,
        max_prefill_queue: int = 2,
        uncached_on: Literal["decode", "prefill"] = "decode",
    ):
        if uncached_on not in ("decode", "prefill"):
            raise ValueError(f"uncached_on must be 'decode' or 'prefill', not {uncached_on!r}")
        self.context = context or PolicyContext()
        self.min_uncached_tokens = int(min_uncached_tokens)
        self.max_prefill_queue = int(max_prefill_queue)
        self.uncached_on = uncached_on

    def uncached(self, x: RoutingInput) -> int:
        return x.append_len if self.uncached_on == "decode" else x.prefill_uncached_len

    def score(self, x: RoutingInput) -> tuple[RouteScore, ...]:
        """Not a cost: 0 for the route the rule picks, inf for the other; the terms show the rule's inputs."""
        terms = {
            "uncached_tokens": float(self.uncached(x)),
            "min_uncached_tokens": float(self.min_uncached_tokens),
            "prefill_queue": float(x.prefill.queued_reqs if x.prefill else 0),
        }
        pick = self._rule(x)[0]
        return tuple(RouteScore(r, 0.0 if r == pick else float("inf"), terms) for r in (Route.PREFILL, Route.DECODE))

    def _rule(self, x: RoutingInput) -> tuple[Route, str]:
        if self.uncached(x) <= self.min_uncached_tokens:
            return Route.DECODE, "below-threshold"
        if x.prefill is not None and x.prefill.queued_reqs >= self.max_prefill_queue:
            return Route.DECODE, "prefill-queue-full"
        return Route.PREFILL, "above-threshold"

    def decide(self, x: RoutingInput) -> Decision:
        fallback = availability_fallback(x, self.name)
        if fallback is not None:
            return fallback
        route, reason = self._rule(x)
        return Decision(route, self.name, reason, x.cache_rate, self.score(x))

    def describe(self) -> dict[str, object]:
        return {
            "policy": self.name,
            "min_uncached_tokens": self.min_uncached_tokens,
            "max_prefill_queue": self.max_prefill_queue,
            "uncached_on": self.uncached_on,
        }
