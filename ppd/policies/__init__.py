"""Routing policies, chosen by name in config (`router.policy`) with `router.policy_params`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ppd.policies.base import Decision, Policy, PolicyContext, Route, RouteScore, RoutingInput, ServerLoad
from ppd.policies.fixed import AlwaysDecode, AlwaysPrefill
from ppd.policies.threshold import ThresholdPolicy


def _auto(**params: Any) -> Policy:
    # imported on first use: auto -> costmodel -> policies.base would otherwise be a cycle through this package
    from ppd.policies.auto import AutoPolicy

    return AutoPolicy(**params)


# name -> factory(context=PolicyContext, **policy_params); every factory accepts `context` as a keyword
_REGISTRY: dict[str, Callable[..., Policy]] = {
    "prefill": lambda **_: AlwaysPrefill(),
    "decode": lambda **_: AlwaysDecode(),
    "threshold": ThresholdPolicy,
    "auto": _auto,
}


def register(name: str, factory: Callable[..., Policy]) -> None:
    _REGISTRY[name] = factory


def make_policy(name: str, context: PolicyContext | None = None, **params: Any) -> Policy:
    if name not in _REGISTRY:
        raise KeyError(f"unknown policy {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](context=context or PolicyContext(), **params)


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


__all__ = [
    "Decision",
    "Policy",
    "PolicyContext",
    "Route",
    "RouteScore",
    "RoutingInput",
    "ServerLoad",
    "make_policy",
    "policy_names",
    "register",
]
