"""The router's Prometheus metrics, in a registry owned by one app (no process-global state)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Latency buckets from a 5 ms decode step up to a 2-minute long-context prefill.
_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30, 60, 120)
# The router's own time on a request's path: tens of microseconds to a few milliseconds.
_ROUTER_PATH_BUCKETS_S = (25e-6, 50e-6, 100e-6, 200e-6, 400e-6, 800e-6, 1.6e-3, 3.2e-3, 6.4e-3, 12.8e-3, 25.6e-3)
_TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1)


class RouterMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "ppd_requests", "Requests by endpoint, route and outcome", ["endpoint", "route", "outcome"], registry=r
        )
        self.ttft = Histogram(
            "ppd_ttft_seconds", "Time to first token", ["route"], buckets=_LATENCY_BUCKETS_S, registry=r
        )
        self.tpot = Histogram(
            "ppd_tpot_seconds", "Time per output token", ["route"], buckets=_TPOT_BUCKETS_S, registry=r
        )
        self.e2e = Histogram("ppd_e2e_seconds", "End-to-end latency", ["route"], buckets=_LATENCY_BUCKETS_S, registry=r)
        self.router_path = Histogram(
            "ppd_router_path_seconds",
            "The router's own time on a request's path to its first token: phase=dispatch from the request's arrival "
            "to its halves written to the servers (parse, checks, tokenizing, planning); phase=relay from the first "
            "token read to its first byte written to the client (streams)",
            ["phase"],
            buckets=_ROUTER_PATH_BUCKETS_S,
            registry=r,
        )
        self.decisions = Counter(
            "ppd_routing_decisions", "Routing decisions", ["policy", "route", "reason"], registry=r
        )
        self.inflight = Gauge("ppd_inflight", "Requests the router has open per backend", ["backend"], registry=r)
        self.backend_queue = Gauge("ppd_backend_queue", "sglang:num_queue_reqs per backend", ["backend"], registry=r)
        self.backend_running = Gauge(
            "ppd_backend_running", "sglang:num_running_reqs per backend", ["backend"], registry=r
        )
        self.backend_healthy = Gauge(
            "ppd_backend_healthy", "1 if the last health check passed", ["backend"], registry=r
        )
        self.index_tokens = Gauge(
            "ppd_prefix_index_tokens", "Tokens the router believes each server caches", ["backend"], registry=r
        )
        self.kv_bytes = Counter("ppd_kv_bytes", "KV bytes moved prefill -> decode by P-route requests", registry=r)
        self.rejected = Counter(
            "ppd_admission_rejected", "Requests refused by admission control", ["reason"], registry=r
        )
        self.aborts = Counter("ppd_backend_aborts", "abort_request calls sent per backend", ["backend"], registry=r)
        self.retries = Counter(
            "ppd_retries",
            "Requests planned a second time after their first attempt failed before the first token",
            ["reason"],
            registry=r,
        )
        self.index_corrections = Counter(
            "ppd_prefix_index_corrections",
            "Times a backend reported fewer cached tokens than the router's index predicted",
            ["backend"],
            registry=r,
        )

    def watch_policies(self, policies: Callable[[], Iterable[Any]]) -> None:
        """Export each policy's `gauges()` (fitted cost-model parameters) as ppd_model_<name>{policy}."""
        self.registry.register(_PolicyGauges(policies))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PolicyGauges(Collector):
    def __init__(self, policies: Callable[[], Iterable[Any]]):
        self._policies = policies

    def describe(self) -> list:
        return []  # names depend on the policies; nothing to check at registration

    def collect(self):
        families: dict[str, GaugeMetricFamily] = {}
        for policy in self._policies():
            gauges = getattr(policy, "gauges", None)
            if gauges is None:
                continue
            try:
                values = gauges()
            except Exception:  # a scrape must not fail because of one policy
                log.exception("policy %s gauges failed", policy.name)
                continue
            for key, value in values.items():
                name = "ppd_model_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
                fam = families.setdefault(
                    name, GaugeMetricFamily(name, f"policy model parameter {key}", labels=["policy"])
                )
                fam.add_metric([policy.name], float(value))
        yield from families.values()
