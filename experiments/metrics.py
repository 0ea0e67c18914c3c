"""The one definition of per-request latency metrics, shared by `ppd sweep`, `ppd replay`, `ppd bench` and
`ppd simulate`.

From a request's arrival time and the times its tokens reached the client:
- TTFT = first token - arrival
- TPOT = (last token - first token) / (tokens - 1)    (undefined, NaN, for a single token)
- E2E  = end - arrival (end = last token, or the response's end when given)
Times go in as seconds of wall clock; every `*_ms` result is divided by `time_scale`, so on an emulator that runs its
GPU `time_scale` times slower than real time the numbers come out in emulated (GPU) milliseconds.

Goodput = requests per second that meet both SLOs (TTFT and TPOT), over the run's duration.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RequestTiming:
    """Client-side timestamps of one streamed request (seconds, any common clock)."""

    arrival_s: float
    token_times_s: tuple[float, ...]  # when each streamed token (or chunk of tokens) arrived
    n_tokens: int | None = None  # tokens generated (usage.completion_tokens); default len(token_times_s)
    end_s: float | None = None  # when the response ended; default the last token

    @property
    def tokens(self) -> int:
        return self.n_tokens if self.n_tokens is not None else len(self.token_times_s)


@dataclass(frozen=True)
class RequestMetrics:
    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    n_tokens: int


@dataclass(frozen=True)
class Slo:
    ttft_ms: float
    tpot_ms: float


def ttft_ms(t: RequestTiming, time_scale: float = 1.0) -> float:
    if not t.token_times_s:
        return math.nan
    return (t.token_times_s[0] - t.arrival_s) * 1e3 / time_scale


def tpot_ms(t: RequestTiming, time_scale: float = 1.0) -> float:
    if t.tokens < 2 or len(t.token_times_s) < 2:
        return math.nan
    return (t.token_times_s[-1] - t.token_times_s[0]) * 1e3 / (t.tokens - 1) / time_scale


def e2e_ms(t: RequestTiming, time_scale: float = 1.0) -> float:
    end = t.end_s if t.end_s is not None else (t.token_times_s[-1] if t.token_times_s else None)
    if end is None:
        return math.nan
    return (end - t.arrival_s) * 1e3 / time_scale


def request_metrics(t: RequestTiming, time_scale: float = 1.0) -> RequestMetrics:
    return RequestMetrics(ttft_ms(t, time_scale), tpot_ms(t, time_scale), e2e_ms(t, time_scale), t.tokens)


def meets_slo(m: RequestMetrics, slo: Slo) -> bool:
    """Both SLOs met. A one-token answer has no TPOT and cannot miss the TPOT SLO."""
    if math.isnan(m.ttft_ms) or m.ttft_ms > slo.ttft_ms:
        return False
    return math.isnan(m.tpot_ms) or m.tpot_ms <= slo.tpot_ms


def goodput_rps(metrics: Iterable[RequestMetrics], duration_s: float, slo: Slo) -> float:
    """Requests per second meeting both SLOs. `duration_s` in the same (emulated) time as the SLOs."""
    if duration_s <= 0:
        return math.nan
    return sum(meets_slo(m, slo) for m in metrics) / duration_s


def percentile(values: Iterable[float], q: float) -> float:
    """q in 0..100, linear interpolation, NaNs ignored; NaN for no values."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    return float(np.percentile(arr, q)) if arr.size else math.nan


def mean(values: Iterable[float]) -> float:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    return float(arr.mean()) if arr.size else math.nan


def describe(values: Iterable[float]) -> dict[str, float]:
    vals = list(values)
    return {
        "mean": mean(vals),
        "p50": percentile(vals, 50),
        "p95": percentile(vals, 95),
        "p99": percentile(vals, 99),
        "count": sum(1 for v in vals if v is not None and not math.isnan(v)),
    }


# --- other streams' view: what an append costs the requests already decoding ---


def gaps_ms(token_times_s: Sequence[float], time_scale: float = 1.0) -> list[float]:
    """Inter-token gaps of one stream."""
    return [(b - a) * 1e3 / time_scale for a, b in zip(token_times_s, token_times_s[1:], strict=False)]


def gaps_in_window_ms(
    token_times_s: Sequence[float], start_s: float, end_s: float, time_scale: float = 1.0
) -> list[float]:
    """Gaps that overlap [start_s, end_s] (a gap ending after start and beginning before end)."""
    return [
        (b - a) * 1e3 / time_scale
        for a, b in zip(token_times_s, token_times_s[1:], strict=False)
        if b > start_s and a < end_s
    ]


def gaps_within_ms(
    token_times_s: Sequence[float], start_s: float, end_s: float, time_scale: float = 1.0
) -> list[float]:
    """Gaps that lie wholly inside [start_s, end_s]."""
    return [
        (b - a) * 1e3 / time_scale
        for a, b in zip(token_times_s, token_times_s[1:], strict=False)
        if a >= start_s and b <= end_s
    ]


def pace_ms(gaps: Sequence[float], clip: float = 2.2) -> float:
    """A stream's undisturbed time per chunk: the mean gap, each gap clipped to `clip` x the median.

    The mean, not the median, because chunks are not always tokens (a token whose bytes do not decode to text yet
    arrives with the next one, a 2-step gap); the clip, because one disturbance in the window (another request's KV
    landing, a client hiccup) must not set the baseline. NaN for no gaps.
    """
    med = percentile(gaps, 50)
    if math.isnan(med):
        return math.nan
    return mean(min(g, clip * med) for g in gaps)


def stream_delay_ms(
    token_times_s: Sequence[float], start_s: float, end_s: float, baseline_tpot_ms: float, time_scale: float = 1.0
) -> float:
    """Extra time one stream lost over [start_s, end_s] against its own baseline TPOT.

    Takes the stream's last token at or before start and its first token at or after end; over those k gaps the
    stream would have needed k x baseline; the excess is the delay imposed on it. Only the two end tokens' client
    jitter enters, so the estimate is unbiased (no clipping of per-gap noise). NaN if the stream does not span the
    window.
    """
    before = [i for i, t in enumerate(token_times_s) if t <= start_s]
    after = [i for i, t in enumerate(token_times_s) if t >= end_s]
    if not before or not after or math.isnan(baseline_tpot_ms):
        return math.nan
    i, j = before[-1], after[0]
    if j <= i:
        return math.nan
    span_ms = (token_times_s[j] - token_times_s[i]) * 1e3 / time_scale
    return span_ms - (j - i) * baseline_tpot_ms
