"""Summaries of a simulation: goodput under SLO, latency percentiles, queueing, KV memory, link load, GPU busy time.

Latency metrics come from experiments.metrics, the one definition every mode uses (bench, replay, simulate): a
simulated request is a `RequestTiming` with its first and last token times and its token count.
Goodput = requests meeting both SLOs per second of the run (issue of the first request to the last completion, or to
the drain limit when some never finished), as a replay against a real stack measures it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from experiments.metrics import RequestTiming, Slo, describe, meets_slo, request_metrics
from ppd.simulate.cluster import SimResult
from ppd.simulate.request import SimRequest


def timing(req: SimRequest) -> RequestTiming:
    if not req.done:
        return RequestTiming(req.issue_s, ())
    return RequestTiming(req.issue_s, (req.first_token_s, req.last_token_s), req.output_tokens, req.last_token_s)


def _ms(values: Iterable[float]) -> dict[str, float]:
    return {k: v for k, v in describe([x * 1e3 for x in values if not math.isnan(x)]).items() if k != "p95"}


def _role_mean(items: list[float]) -> float:
    return sum(items) / len(items) if items else 0.0


def summarize(result: SimResult, slo: Slo, workload: str = "") -> dict[str, Any]:
    spec = result.spec
    reqs = result.requests
    end = result.end_s if result.end_s > 0 else 1e-9
    metrics = [request_metrics(timing(r)) for r in reqs]
    good = [meets_slo(m, slo) for m in metrics]
    done = [r for r in reqs if r.done]
    p_route = [r for r in done if r.route == "prefill"]
    routes: dict[str, int] = {}
    for r in reqs:
        routes[r.route] = routes.get(r.route, 0) + 1

    servers: dict[str, dict[str, Any]] = {}
    by_role: dict[str, dict[str, list[float]]] = {}
    for s in result.servers:
        kv = s.pool.stats(end)
        busy = (s.stats.prefill_busy_s + s.stats.decode_busy_s) / end
        servers[s.name] = {
            "role": s.role,
            "busy_frac": busy,
            "prefill_busy_frac": s.stats.prefill_busy_s / end,
            "decode_busy_frac": s.stats.decode_busy_s / end,
            "prefill_tokens": s.stats.prefill_tokens,
            "decode_tokens": s.stats.decode_tokens,
            "max_batch": s.stats.max_batch,
            "kv": kv,
        }
        role = by_role.setdefault(s.role, {"busy": [], "peak": [], "mean": []})
        role["busy"].append(busy)
        role["peak"].append(kv["peak_used_frac"])
        role["mean"].append(kv["mean_used_tokens"] / kv["capacity_tokens"] if kv["capacity_tokens"] else 0.0)

    ports = {name: {**st, "util": st["busy_s"] / end} for name, st in result.ports.items()}
    total_bytes = sum(r.kv_bytes for r in reqs)
    n_good = sum(good)
    return {
        "ratio": spec.ratio,
        "mode": spec.mode,
        "policy": result.policy_name if spec.mode == "disaggregated" else "colocated",
        "workload": workload,
        "gpu": spec.gpu,
        "model": spec.model,
        "link": spec.link,
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "requests": len(reqs),
        "completed": len(done),
        "failed": sum(1 for r in reqs if r.failed),
        "duration_s": end,
        "offered_rps": len(reqs) / end,
        "goodput_rps": n_good / end,
        "slo_attainment": n_good / len(reqs) if reqs else math.nan,
        "throughput_rps": len(done) / end,
        "output_tokens_per_s": sum(r.output_tokens for r in done) / end,
        "ttft_ms": {k: v for k, v in describe(m.ttft_ms for m in metrics).items() if k != "p95"},
        "tpot_ms": {k: v for k, v in describe(m.tpot_ms for m in metrics).items() if k != "p95"},
        "e2e_ms": {k: v for k, v in describe(m.e2e_ms for m in metrics).items() if k != "p95"},
        # waiting for KV admission + prefill queue, before the first forward that computes the request
        "queue_ms": _ms(r.prefill_start_s - r.enqueue_s for r in done),
        "transfer_wait_ms": _ms(r.transfer_start_s - r.prefill_end_s for r in p_route),
        "join_wait_ms": _ms(r.first_token_s - r.transfer_end_s for r in p_route),
        "routes": routes,
        "cache_hit_frac": sum(r.cached_tokens for r in done) / max(1, sum(r.prompt_tokens for r in done)),
        "kv": {
            role: {
                "peak_used_frac_max": max(v["peak"]),
                "mean_used_frac": _role_mean(v["mean"]),
            }
            for role, v in by_role.items()
        },
        "busy_frac": {role: _role_mean(v["busy"]) for role, v in by_role.items()},
        "transfer": {
            "count": sum(1 for r in reqs if r.kv_bytes),
            "bytes": total_bytes,
            "gbytes_per_s": total_bytes / end / 1e9,
            "link_util_max": max((p["util"] for p in ports.values()), default=0.0),
            "link_util_mean": _role_mean([p["util"] for p in ports.values()]),
            "ports": ports,
        },
        "servers": servers,
    }
