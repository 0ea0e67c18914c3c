"""Ratio sweeps and the highest request rate a deployment sustains under an SLO.

`WorkloadSource` turns a preset name, a `WorkloadSpec`, a trace file or a list of `TraceRequest`s into a trace at any
request rate (generated workloads are regenerated with common random numbers; a fixed trace has its arrivals
compressed or stretched), so every P:D ratio sees the same requests.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from experiments.metrics import Slo
from ppd.simulate.cluster import ClusterSpec, simulate
from ppd.simulate.summary import summarize
from ppd.simulate.trace import TraceRequest, offered_rate, read_trace, scale_time
from ppd.simulate.workload import WorkloadSpec, generate, workload

WARMUP_FRAC = 0.25  # share of a generated workload's arrival window left out of the statistics


@dataclass(frozen=True)
class WorkloadSource:
    name: str
    spec: WorkloadSpec | None = None
    trace: tuple[TraceRequest, ...] = ()
    duration_s: float = 300.0
    seed: int = 0

    @property
    def default_rate(self) -> float:
        return self.spec.rate if self.spec is not None else offered_rate(self.trace)

    def default_slo(self) -> Slo:
        if self.spec is not None:
            return Slo(self.spec.slo_ttft_ms, self.spec.slo_tpot_ms)
        return Slo(1000.0, 50.0)

    def at(
        self, rate: float | None = None, max_requests: int | None = None, min_duration_s: float = 60.0
    ) -> list[TraceRequest]:
        """The trace at `rate`; `max_requests` shortens a generated workload to about that many requests (but at
        least `min_duration_s` of arrivals), which keeps rate searches at high rates affordable."""
        if self.spec is not None:
            return generate(self.spec, rate, self.window(rate, max_requests, min_duration_s), self.seed)
        if rate is None:
            return list(self.trace)
        return scale_time(self.trace, self.default_rate / rate)

    def window(self, rate: float | None, max_requests: int | None = None, min_duration_s: float = 60.0) -> float:
        """Arrival window of the generated trace at `rate` (see `at`)."""
        duration = self.duration_s
        if max_requests is not None and rate:
            duration = min(duration, max(min_duration_s, max_requests / rate))
        return duration

    def describe(self) -> str:
        if self.spec is not None:
            return self.spec.describe()
        return f"{self.name}: trace of {len(self.trace)} requests at {self.default_rate:.2f} req/s"


def as_source(
    workload_: str | WorkloadSpec | Sequence[TraceRequest] | WorkloadSource,
    duration_s: float | None = None,
    seed: int = 0,
) -> WorkloadSource:
    """A preset name ("chat", "rag", "long-output", "fixed"), a .jsonl trace path, a WorkloadSpec or a trace."""
    if isinstance(workload_, WorkloadSource):
        return workload_
    if isinstance(workload_, WorkloadSpec):
        return WorkloadSource(workload_.name, workload_, duration_s=duration_s or workload_.duration_s, seed=seed)
    if isinstance(workload_, str):
        if workload_.endswith(".jsonl") or pathlib.Path(workload_).is_file():
            return WorkloadSource(pathlib.Path(workload_).stem, trace=tuple(read_trace(workload_)), seed=seed)
        spec = workload(workload_)
        return WorkloadSource(spec.name, spec, duration_s=duration_s or spec.duration_s, seed=seed)
    return WorkloadSource("trace", trace=tuple(workload_), seed=seed)


def ratio_specs(gpus: int, base: ClusterSpec, include_colocated: bool = True) -> list[ClusterSpec]:
    """0:gpus (colocated), then 1:gpus-1 .. gpus-1:1."""
    if gpus < 1:
        raise ValueError("gpus must be >= 1")
    out = [replace(base, colocated=gpus, prefill=0, decode=0)] if include_colocated else []
    out += [replace(base, colocated=0, prefill=p, decode=gpus - p) for p in range(1, gpus)]
    return out


def run_point(
    source: WorkloadSource,
    spec: ClusterSpec,
    slo: Slo,
    rate: float | None = None,
    drain_s: float = 120.0,
    max_requests: int | None = None,
    min_duration_s: float = 60.0,
    warmup_frac: float = WARMUP_FRAC,
) -> dict[str, Any]:
    """One simulation. A generated workload is measured over its arrival window minus the first `warmup_frac` (queues
    and batches filling up); a trace over all its requests."""
    trace = source.at(rate, max_requests, min_duration_s)
    result = simulate(trace, spec, drain_s)
    if source.spec is not None:
        duration = source.window(rate, max_requests, min_duration_s)
        summary = summarize(result, slo, source.name, warmup_frac * duration, duration)
    else:
        summary = summarize(result, slo, source.name)
    summary["rate"] = rate if rate is not None else source.default_rate
    return summary


def max_rate(
    source: WorkloadSource,
    spec: ClusterSpec,
    slo: Slo,
    attainment: float = 0.9,
    start_rate: float | None = None,
    rel_tol: float = 0.03,
    max_rate_rps: float = 2000.0,
    drain_s: float = 60.0,
    search_requests: int | None = 4000,
    min_duration_s: float = 60.0,
    on_point: Callable[[float, dict[str, Any]], None] | None = None,
) -> tuple[float, dict[str, Any] | None, dict[str, Any] | None]:
    """Highest request rate at which >= `attainment` of requests meet the SLO (bisection on the rate).

    Returns (rate, summary at that rate, summary at the first failing rate above it). Rate 0 and no summary when
    even the lowest tried rate fails. Each point simulates about `search_requests` requests of a generated workload
    (None: the source's full duration), over at least `min_duration_s` of arrivals.
    """

    def ok(rate: float) -> tuple[bool, dict[str, Any]]:
        s = run_point(source, spec, slo, rate, drain_s, search_requests, min_duration_s)
        if on_point is not None:
            on_point(rate, s)
        return s["slo_attainment"] >= attainment, s

    rate = start_rate or source.default_rate
    good: tuple[float, dict[str, Any] | None] = (0.0, None)
    bad: tuple[float, dict[str, Any] | None] = (math.inf, None)
    passed, s = ok(rate)
    if passed:
        good = (rate, s)
        while rate < max_rate_rps:
            rate = min(max_rate_rps, rate * 2)
            passed, s = ok(rate)
            if not passed:
                bad = (rate, s)
                break
            good = (rate, s)
        else:
            return good[0], good[1], None
    else:
        bad = (rate, s)
        while rate > 1e-3:
            rate /= 2
            passed, s = ok(rate)
            if passed:
                good = (rate, s)
                break
            bad = (rate, s)
        else:
            return 0.0, None, bad[1]
    while (bad[0] - good[0]) > rel_tol * bad[0]:
        mid = (good[0] + bad[0]) / 2
        passed, s = ok(mid)
        if passed:
            good = (mid, s)
        else:
            bad = (mid, s)
    return good[0], good[1], bad[1]
