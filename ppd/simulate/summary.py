"""Summaries of a simulation: goodput under SLO, latency percentiles, queueing, KV memory, link load, GPU busy time.

Latency metrics come from experiments.metrics, the one definition every mode uses (bench, replay, simulate): a
simulated request is a `RequestTiming` with its first and last token times and its token count.
Goodput = requests meeting both SLOs per second of the workload's arrival window (the span over which conversations
start; for a generated workload its duration), so goodput = SLO attainment x offered rate, DistServe-style. Later
turns of the last conversations run past the window; the run's makespan (to the last completion) is reported as
`makespan_s`, and throughput is measured over it. A replay that divides by its wall time instead gets a lower number
for the same requests; compare like with like. Requests that were rejected, did not fit or never finished count as
misses.

`ttft_breakdown_ms` splits the mean TTFT into where the time went, and `bottleneck` names the largest part (or TPOT):
- admission: waiting for KV memory on the decode / colocated server (decode side full),
- prefill_queue: waiting for the prefill GPU (P-route: the prefill server; D-route / colocated: the serving GPU busy
  with other prefills and the decode step under way),
- prefill: the prefill forwards themselves, link: waiting for and moving the KV, landing: waiting to join the decode
  batch, overhead: host-side request overhead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from experiments.metrics import RequestTiming, Slo, describe, goodput_rps, meets_slo, request_metrics
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


def _mean_ms(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return 1e3 * sum(vals) / len(vals) if vals else 0.0


def ttft_breakdown_ms(done: list[SimRequest]) -> dict[str, float]:
    p = [r for r in done if r.route == "prefill"]
    local = [r for r in done if r.route != "prefill"]
    n = max(1, len(done))

    def part(rs: list[SimRequest], f) -> float:  # mean over all requests (0 for those without this stage)
        return _mean_ms(f(r) for r in rs) * len(rs) / n

    return {
        "overhead": _mean_ms(r.enqueue_s - r.issue_s for r in done),
        "admission": part(done, lambda r: r.admitted_s - r.enqueue_s),
        "prefill_queue": part(p, lambda r: r.prefill_start_s - r.admitted_s)
        + part(local, lambda r: r.prefill_start_s - r.admitted_s),
        "prefill": _mean_ms(r.prefill_end_s - r.prefill_start_s for r in done),
        "link": part(p, lambda r: r.transfer_end_s - r.prefill_end_s),
        "landing": part(p, lambda r: r.first_token_s - r.transfer_end_s),
    }


def bottleneck(summary: dict[str, Any]) -> str:
    """What fails first: 'tpot' when more requests miss the TPOT SLO than the TTFT SLO, else the largest waiting part
    of TTFT (admission, prefill_queue, link, landing), or 'none' when (almost) everything meets the SLO."""
    if summary["slo_attainment"] >= 0.99:
        return "none"
    if summary["tpot_miss_frac"] > summary["ttft_miss_frac"]:
        return "tpot"
    if summary["rejected_frac"] + summary["unfinished_frac"] > summary["ttft_miss_frac"] / 2:
        return "rejected"
    parts = {
        k: v for k, v in summary["ttft_breakdown_ms"].items() if k in ("admission", "prefill_queue", "link", "landing")
    }
    return max(parts, key=parts.get) if any(parts.values()) else "prefill"


def summarize(
    result: SimResult,
    slo: Slo,
    workload: str = "",
    measure_from_s: float = 0.0,
    measure_to_s: float | None = None,
) -> dict[str, Any]:
    """Per-request statistics over the requests issued in [measure_from_s, measure_to_s) (default: all; a warm-up
    and the tail after the arrival window are usually left out); server, KV and link statistics over the whole run.
    Goodput divides by the measured window (default: the trace's arrival window)."""
    spec = result.spec
    end = result.end_s if result.end_s > 0 else 1e-9
    upper = math.inf if measure_to_s is None else measure_to_s
    reqs = [r for r in result.requests if measure_from_s <= r.issue_s < upper]
    window = (measure_to_s if measure_to_s is not None else result.window_s) - measure_from_s
    if window <= 0:
        window = end
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
        busy = (s.stats.prefill_busy_s + s.stats.decode_busy_s + s.stats.landing_busy_s) / end
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
        role = by_role.setdefault(s.role, {"busy": [], "peak": [], "mean": [], "peak_active": [], "mean_active": []})
        role["busy"].append(busy)
        cap = kv["capacity_tokens"] or 1
        role["peak_active"].append(kv["peak_active_tokens"] / cap)
        role["mean_active"].append(kv["mean_active_tokens"] / cap)
        role["peak"].append(kv["peak_used_frac"])
        role["mean"].append(kv["mean_used_tokens"] / kv["capacity_tokens"] if kv["capacity_tokens"] else 0.0)

    ports = {name: {**st, "util": st["busy_s"] / end} for name, st in result.ports.items()}
    total_bytes = sum(r.kv_bytes for r in result.requests)
    n_good = sum(good)
    n = max(1, len(reqs))
    out = {
        "ratio": spec.ratio,
        "mode": spec.mode,
        "policy": result.policy_name if spec.mode == "disaggregated" else "colocated",
        "workload": workload,
        "gpu": spec.gpu,
        "model": spec.model,
        "link": spec.link,
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "measured_from_s": measure_from_s,
        "measured_to_s": measure_to_s,
        "requests": len(reqs),
        "requests_simulated": len(result.requests),
        "completed": len(done),
        "failed": sum(1 for r in reqs if r.failed),
        "rejected_frac": sum(1 for r in reqs if r.failed.startswith("rejected")) / n,
        "unfinished_frac": sum(1 for r in reqs if not r.done and not r.failed) / n,
        "duration_s": window,
        "makespan_s": end,
        "offered_rps": len(reqs) / window,
        "goodput_rps": goodput_rps(metrics, window, slo),
        "slo_attainment": n_good / len(reqs) if reqs else math.nan,
        "throughput_rps": len(done) / end,
        "output_tokens_per_s": sum(r.output_tokens for r in done) / end,
        "ttft_miss_frac": sum(1 for m in metrics if math.isnan(m.ttft_ms) or m.ttft_ms > slo.ttft_ms) / n,
        "tpot_miss_frac": sum(1 for m in metrics if not math.isnan(m.tpot_ms) and m.tpot_ms > slo.tpot_ms) / n,
        "ttft_ms": {k: v for k, v in describe(m.ttft_ms for m in metrics).items() if k != "p95"},
        "tpot_ms": {k: v for k, v in describe(m.tpot_ms for m in metrics).items() if k != "p95"},
        "e2e_ms": {k: v for k, v in describe(m.e2e_ms for m in metrics).items() if k != "p95"},
        # waiting for KV admission + prefill queue, before the first forward that computes the request
        "queue_ms": _ms(r.prefill_start_s - r.enqueue_s for r in done),
        "transfer_wait_ms": _ms(r.transfer_start_s - r.prefill_end_s for r in p_route),
        "join_wait_ms": _ms(r.first_token_s - r.transfer_end_s for r in p_route),
        "ttft_breakdown_ms": ttft_breakdown_ms(done),
        # the same over the requests that missed the TTFT SLO: where the tail's time went
        "ttft_breakdown_missed_ms": ttft_breakdown_ms(
            [r for r, m in zip(reqs, metrics, strict=True) if r.done and m.ttft_ms > slo.ttft_ms]
        ),
        "routes": routes,
        "cache_hit_frac": sum(r.cached_tokens for r in done) / max(1, sum(r.prompt_tokens for r in done)),
        "kv": {
            role: {
                "peak_active_frac_max": max(v["peak_active"]),
                "mean_active_frac": _role_mean(v["mean_active"]),
                "peak_used_frac_max": max(v["peak"]),
                "mean_used_frac": _role_mean(v["mean"]),
            }
            for role, v in by_role.items()
        },
        "busy_frac": {role: _role_mean(v["busy"]) for role, v in by_role.items()},
        "transfer": {
            "count": sum(1 for r in result.requests if r.kv_bytes),
            "bytes": total_bytes,
            "gbytes_per_s": total_bytes / end / 1e9,  # over the whole run
            "link_util_max": max((p["util"] for p in ports.values()), default=0.0),
            "link_util_mean": _role_mean([p["util"] for p in ports.values()]),
            "ports": ports,
        },
        "servers": servers,
    }
    out["bottleneck"] = bottleneck(out)
    return out
