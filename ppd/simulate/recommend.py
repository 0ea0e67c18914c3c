"""P:D ratio recommendation: simulate every split of a GPU budget (0:N colocated, 1:N-1 .. N-1:1) and pick the best.

    rec = recommend_ratio("chat", gpus=6)                       # highest rate each ratio sustains under the SLO
    rec = recommend_ratio("rag", gpus=6, rate=20.0)             # goodput at 20 req/s, ties broken by headroom
    print(rec.explain()); rec.to_dict(); rec.to_markdown()

Objective:
- `rate=None`: the highest request rate at which >= `attainment` (90 %) of requests meet both SLOs (DistServe's
  goodput), searched by bisection per ratio;
- `rate=R`: goodput (requests/s meeting the SLO) at R; ratios within `tie_tol` of the best are then ranked by their
  highest sustainable rate, so the pick is the one with the most headroom.
The reasoning names what limits each side: it looks at the best ratio (and its neighbours) just past their highest
sustainable rate and reports which SLO fails first and where TTFT goes (prefill queue -> prefill-bound; KV admission,
landing or TPOT -> decode-bound; link -> KV-transfer-bound), plus KV memory and link utilisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from experiments.metrics import Slo
from ppd.simulate.cluster import ClusterSpec
from ppd.simulate.sweep import WorkloadSource, as_source, max_rate, ratio_specs, run_point
from ppd.simulate.trace import TraceRequest
from ppd.simulate.workload import WorkloadSpec

_COLOCATED_WORDS = {
    "prefill_queue": "GPU-bound (requests wait behind other prefills and decode steps on their GPU)",
    "admission": "memory-bound (requests wait for KV memory)",
    "tpot": "interference-bound (TPOT: decode steps stalled by prefills, or batches too large)",
}
_BOUND_WORDS = {
    "prefill_queue": "prefill-bound (requests wait for a prefill GPU)",
    "admission": "decode-bound (requests wait for KV memory on the decode side)",
    "landing": "decode-bound (transferred requests wait to join the decode batch)",
    "tpot": "decode-bound (TPOT: decode batches too large or stalled by prefills)",
    "link": "link-bound (KV transfers queue on the link)",
    "prefill": "prefill-bound (prefill compute alone exceeds the TTFT SLO)",
    "rejected": "admission-bound (requests rejected at the router's in-flight limit per server, or never served)",
    "none": "not saturated",
}


@dataclass(frozen=True)
class RatioResult:
    spec: ClusterSpec
    summary: dict[str, Any] | None  # at the evaluation rate (rate given) or at the highest sustainable rate
    max_rate_rps: float | None = None  # highest rate meeting the SLO at `attainment` (None: not computed)
    over: dict[str, Any] | None = None  # summary just past max_rate: what breaks first

    @property
    def ratio(self) -> str:
        return self.spec.ratio

    @property
    def goodput_rps(self) -> float:
        return self.summary["goodput_rps"] if self.summary else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "prefill": self.spec.prefill,
            "decode": self.spec.decode,
            "colocated": self.spec.colocated,
            "max_rate_rps": self.max_rate_rps,
            "bottleneck": self.over["bottleneck"] if self.over else None,
            "summary": _slim(self.summary),
            "over": _slim(self.over),
        }


@dataclass(frozen=True)
class Recommendation:
    workload: str
    workload_description: str
    gpus: int
    slo: Slo
    rate: float | None  # None: objective max_rate
    objective: str  # "max_rate" | "goodput"
    best: RatioResult
    candidates: tuple[RatioResult, ...]
    reasoning: tuple[str, ...]

    @property
    def ratio(self) -> str:
        return self.best.ratio

    def explain(self) -> str:
        return "\n".join(self.reasoning)

    def to_dict(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "workload_description": self.workload_description,
            "gpus": self.gpus,
            "slo": {"ttft_ms": self.slo.ttft_ms, "tpot_ms": self.slo.tpot_ms},
            "rate": self.rate,
            "objective": self.objective,
            "recommended": self.best.ratio,
            "reasoning": list(self.reasoning),
            "candidates": [c.to_dict() for c in self.candidates],
        }

    def to_markdown(self) -> str:
        from ppd.simulate.report import recommendation_table

        return recommendation_table(self)


def recommend_ratio(
    workload: str | WorkloadSpec | Sequence[TraceRequest] | WorkloadSource,
    gpus: int,
    slo: Slo | None = None,
    *,
    rate: float | None = None,
    cluster: ClusterSpec | None = None,
    include_colocated: bool = True,
    duration_s: float | None = None,
    seed: int = 0,
    attainment: float = 0.9,
    tie_tol: float = 0.02,
    search_requests: int | None = 4000,
    min_duration_s: float = 60.0,
    rel_tol: float = 0.03,
    log: Callable[[str], None] | None = None,
) -> Recommendation:
    """Best P:D split of `gpus` GPUs for `workload`, with the reasoning.

    workload: a preset name ("chat", "rag", "long-output", "fixed"), a path to a JSONL trace
        (ppd.simulate.trace), a `WorkloadSpec`, or a list of `TraceRequest`s.
    gpus: the GPU budget; candidates are 0:gpus (colocated, if `include_colocated`) and p:(gpus-p) for p = 1..gpus-1.
    slo: TTFT and TPOT targets (experiments.metrics.Slo); default: the workload preset's.
    rate: requests/s to judge goodput at; None = compare the highest rate each ratio sustains under the SLO.
    cluster: hardware and knobs shared by all candidates (gpu, model, link, policy, chunk size, ...); its server
        counts are ignored. Default `ClusterSpec()` (H200, Llama-3-8B, NVLink, always-prefill routing).
    duration_s, seed: the generated workload's length and seed (ignored for a trace's arrival times).
    attainment: the share of requests that must meet the SLO for a rate to count as sustained.
    search_requests, min_duration_s: each point of a rate search simulates about this many requests of a generated
        workload, over at least this many seconds of arrivals (None: the full `duration_s`); the search stops when
        the highest passing and lowest failing rate are within `rel_tol`.
    log: called with one line per simulated point (progress), e.g. `print`.
    """
    source = as_source(workload, duration_s, seed)
    slo = slo or source.default_slo()
    base = cluster or ClusterSpec()
    specs_ = ratio_specs(gpus, base, include_colocated)
    say = log or (lambda _msg: None)

    def search(spec: ClusterSpec) -> tuple[float, dict | None, dict | None]:
        def point(r: float, s: dict) -> None:
            say(f"  {spec.ratio:>5} @ {r:8.2f} req/s: attainment {s['slo_attainment']:.3f}, {s['bottleneck']}")

        return max_rate(
            source,
            spec,
            slo,
            attainment,
            start_rate=rate or source.default_rate,
            search_requests=search_requests,
            min_duration_s=min_duration_s,
            rel_tol=rel_tol,
            on_point=point,
        )

    results: list[RatioResult] = []
    if rate is None:
        for spec in specs_:
            r, at, over = search(spec)
            results.append(RatioResult(spec, at, r, over))
        best = max(results, key=lambda c: (c.max_rate_rps or 0.0, -_ttft_p99(c.summary)))
    else:
        for spec in specs_:
            s = run_point(source, spec, slo, rate)
            say(f"  {spec.ratio:>5} @ {rate:8.2f} req/s: goodput {s['goodput_rps']:.2f}, {s['bottleneck']}")
            results.append(RatioResult(spec, s))
        top = max(c.goodput_rps for c in results)
        tied = [c for c in results if c.goodput_rps >= (1 - tie_tol) * top]
        if len(tied) > 1:
            for i, c in enumerate(results):
                if c in tied:
                    r, _, over = search(c.spec)
                    results[i] = replace(c, max_rate_rps=r, over=over)
            tied = [c for c in results if c.goodput_rps >= (1 - tie_tol) * top]
        best = max(tied, key=lambda c: (c.max_rate_rps or 0.0, -_ttft_p99(c.summary)))
        if best.over is None:  # the reasoning needs to know what breaks first
            r, _, over = search(best.spec)
            best_i = results.index(best)
            best = results[best_i] = replace(best, max_rate_rps=r, over=over)

    reasoning = _reasoning(source, slo, rate, best, results, gpus, rel_tol)
    return Recommendation(
        workload=source.name,
        workload_description=source.describe(),
        gpus=gpus,
        slo=slo,
        rate=rate,
        objective="max_rate" if rate is None else "goodput",
        best=best,
        candidates=tuple(results),
        reasoning=tuple(reasoning),
    )


def _ttft_p99(summary: dict[str, Any] | None) -> float:
    return summary["ttft_ms"]["p99"] if summary else float("inf")


def _slim(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    if summary is None:
        return None
    return {k: v for k, v in summary.items() if k not in ("servers",)}


def _reasoning(
    source: WorkloadSource,
    slo: Slo,
    rate: float | None,
    best: RatioResult,
    results: list[RatioResult],
    gpus: int,
    rel_tol: float,
) -> list[str]:
    lines = [f"workload {source.describe()}"]
    lines.append(f"SLO: TTFT <= {slo.ttft_ms:g} ms and TPOT <= {slo.tpot_ms:g} ms; {gpus} GPUs")
    if rate is None:
        ranked = sorted(results, key=lambda c: -(c.max_rate_rps or 0.0))
        lines.append(
            "highest rate meeting the SLO: " + ", ".join(f"{c.ratio} {c.max_rate_rps or 0.0:.2f} req/s" for c in ranked)
        )
    else:
        ranked = sorted(results, key=lambda c: -c.goodput_rps)
        lines.append(f"goodput at {rate:g} req/s: " + ", ".join(f"{c.ratio} {c.goodput_rps:.2f} req/s" for c in ranked))
    why = f"recommended {best.ratio}"
    if best.max_rate_rps is not None:
        why += f" (sustains {best.max_rate_rps:.2f} req/s)"
    lines.append(why)
    if rate is None and best.max_rate_rps:
        close = [
            c.ratio
            for c in results
            if c is not best and (c.max_rate_rps or 0.0) >= (1 - 2 * rel_tol) * best.max_rate_rps
        ]
        if close:
            lines.append(
                f"{', '.join(close)} {'is' if len(close) == 1 else 'are'} within {2 * rel_tol:.0%} of it (the rate search's "
                "resolution and the workload's noise): the split matters little here, so choose among these on other "
                "grounds (fewer moving parts favour colocated; headroom for longer prompts favours more prefill GPUs)"
            )
    if best.over is not None:
        o = best.over
        bd = o["ttft_breakdown_missed_ms"] if o["ttft_miss_frac"] > 0 else o["ttft_breakdown_ms"]
        who = "of the requests missing TTFT" if o["ttft_miss_frac"] > 0 else "of all requests"
        parts = ", ".join(f"{k} {v:.0f} ms" for k, v in bd.items() if v >= 0.5)
        lost = o["rejected_frac"] + o["unfinished_frac"]
        lines.append(
            f"past that rate it is {_words(best.spec, o['bottleneck'])}: "
            f"{o['ttft_miss_frac']:.0%} miss TTFT ({lost:.0%} rejected or unserved), {o['tpot_miss_frac']:.0%} miss "
            f"TPOT" + (f"; mean TTFT {who}: {parts}" if parts else "")
        )
    # neighbours: one GPU moved from decode to prefill, or back
    by_ratio = {(c.spec.prefill, c.spec.decode, c.spec.colocated): c for c in results}
    s = best.spec
    if s.colocated == 0:
        for dp, label in ((+1, "one more prefill GPU"), (-1, "one more decode GPU")):
            n = by_ratio.get((s.prefill + dp, s.decode - dp, 0))
            if n is not None:
                lines.append(f"{label} ({n.ratio}): {_compare(n, best, rate)}")
        colo = by_ratio.get((0, 0, gpus))
        if colo is not None:
            lines.append(f"colocated ({colo.ratio}): {_compare(colo, best, rate)}")
    else:
        splits = [c for c in results if c.spec.colocated == 0]
        if splits:
            top = max(splits, key=lambda c: (c.max_rate_rps or 0.0, c.goodput_rps))
            lines.append(
                f"best split ({top.ratio}): {_compare(top, best, rate)}; a colocated GPU does both phases, so it "
                "is not idle when the mix of prompt and answer work shifts, and a multi-turn append stays on the "
                "server that holds its KV"
            )
    summ = best.over or best.summary
    if summ is not None:
        kv = summ["kv"]
        kv_text = ", ".join(f"{role} peak {v['peak_active_frac_max']:.0%}" for role, v in kv.items())
        lines.append(
            f"KV memory in use by requests ({'just past the highest rate' if best.over else 'at the rate'}): {kv_text}"
        )
        tr = summ["transfer"]
        if tr["count"]:
            lines.append(
                f"KV link: {tr['gbytes_per_s']:.2f} GB/s moved, busiest port {tr['link_util_max']:.0%} utilised"
                + (" -- the link is a bottleneck" if tr["link_util_max"] > 0.7 else "")
            )
    return lines


def _words(spec: ClusterSpec, bottleneck: str) -> str:
    table = _COLOCATED_WORDS if spec.colocated else {}
    return table.get(bottleneck) or _BOUND_WORDS.get(bottleneck, bottleneck)


def _compare(other: RatioResult, best: RatioResult, rate: float | None) -> str:
    if rate is None or (other.max_rate_rps is not None and best.max_rate_rps is not None):
        a, b = other.max_rate_rps or 0.0, best.max_rate_rps or 0.0
        rel = (a - b) / b if b else 0.0
        text = f"{a:.2f} req/s ({rel:+.0%})"
    else:
        a, b = other.goodput_rps, best.goodput_rps
        rel = (a - b) / b if b else 0.0
        text = f"goodput {a:.2f} req/s ({rel:+.0%})"
    if other.over is not None:
        text += f", {_words(other.spec, other.over['bottleneck']).split(' (')[0]}"
    elif other.summary is not None and other.summary["bottleneck"] != "none":
        text += f", {_words(other.spec, other.summary['bottleneck']).split(' (')[0]}"
    return text
