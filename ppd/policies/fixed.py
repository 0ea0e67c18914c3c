"""The two fixed baselines: always P-route (what SGLang PD does) and always D-route."""

from __future__ import annotations

from dataclasses import dataclass

from ppd.policies.base import Decision, Route, RouteScore, RoutingInput, availability_fallback


@dataclass(frozen=True)
class AlwaysPrefill:
    name: str = "prefill"

    def score(self, x: RoutingInput) -> tuple[RouteScore, ...]:
        return (RouteScore(Route.PREFILL, 0.0), RouteScore(Route.DECODE, float("inf")))

    def decide(self, x: RoutingInput) -> Decision:
        fallback = availability_fallback(x, self.name)
        if fallback is not None:
            return fallback
        return Decision(Route.PREFILL, self.name, "fixed", x.cache_rate, self.score(x))


@dataclass(frozen=True)
class AlwaysDecode:
    name: str = "decode"

    def score(self, x: RoutingInput) -> tuple[RouteScore, ...]:
        return (RouteScore(Route.DECODE, 0.0), RouteScore(Route.PREFILL, float("inf")))

    def decide(self, x: RoutingInput) -> Decision:
        return Decision(Route.DECODE, self.name, "fixed", x.cache_rate, self.score(x))
