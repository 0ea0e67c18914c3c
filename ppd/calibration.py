"""Online calibration of the cost model: fit its effective parameters to what the router measured.

Fitted (`ppd.costmodel.FITTED_FIELDS`): achieved-FLOP/s and HBM-bandwidth multipliers per side, link bandwidth and
per-transfer latency, and the fixed host overhead of each route. Every roofline term of a prefill chunk is the larger
of a FLOP time (inversely proportional to FLOP/s) and a byte time (inversely proportional to bandwidth), so each
observation is decomposed once into both sides of each max at unit scales, by probing `ppd.roofline` with a GPU of
unlimited bandwidth and one of unlimited FLOP/s (`features`); the fit then re-composes the chunk times for a whole
window with a few numpy operations (`_Batch.predict`; a unit test holds it equal to the cost model).

Residuals are log(predicted / measured) for TTFT, and for backend-reported `prefill_ms` and `transfer_ms` when the
server sent them (the emulator does; real SGLang does not), minimised by `scipy.optimize.least_squares` with the
robust soft-L1 loss over a sliding window, plus a weak pull toward the prior (the specs) so that parameters the window
cannot see (no P-route requests yet, say) stay where the specs put them.

Pure: `features` and `fit` take plain data; the `Calibrator` holds the window; `save_state` / `load_state` are the only
file I/O and are called by the router (router.calibration_path), not by the fit. A fit takes tens of ms: a server
(the router) must not run it on its event loop, so `Calibrator.add` + `refit_job` split a refit into the fit over a
snapshot of the window (`RefitJob.work`: pure and picklable, so the router runs it in a worker process where it
cannot hold the event loop's GIL) and the installation of its result (`RefitJob.install`, on the owner's thread).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ppd import roofline
from ppd.costmodel import (
    FITTED_FIELDS,
    CostParams,
    decode_step_ms,
    kv_chunk_bytes,
)
from ppd.policies.base import Observation, Route, ServerLoad

STATE_VERSION = 1
_LOG_FIELDS = {  # fitted in log space (positive rates)
    "prefill_compute_scale",
    "prefill_memory_scale",
    "decode_compute_scale",
    "decode_memory_scale",
    "link_bytes_per_s",
}
_P_FIELDS = ("prefill_compute_scale", "prefill_memory_scale", "prefill_route_overhead_ms", "link_bytes_per_s")
_D_FIELDS = ("decode_compute_scale", "decode_memory_scale", "decode_route_overhead_ms")


@dataclass(frozen=True)
class Features:
    """One finished request, decomposed at unit scales (see module doc). Times in seconds unless named _ms."""

    route: Route
    # per chunk, at the spec's peaks: _c terms divide by the compute scale, _m terms by the memory scale
    linear_c: tuple[float, ...]  # GEMM FLOPs
    linear_m: tuple[float, ...]  # reading the weights once (the linear term's floor)
    causal_c: tuple[float, ...]  # attention among the new tokens
    prefix_c: tuple[float, ...]  # attention over the cached prefix
    floor_m: tuple[float, ...]  # streaming the prefix KV (the prefix term's floor)
    fixed_s: tuple[float, ...]  # fixed forward overhead
    chunk_bytes: tuple[int, ...]  # per chunk: KV sent after it (P-route)
    per_token_ms: float  # host cost proportional to prompt length (not fitted)
    wait_ms: float  # queue wait: the server's report when present, else the model's at routing time
    admission_ms: float  # P-route: wait for the decode step boundary
    ttft_ms: float
    prefill_ms: float | None  # backend-reported, when present
    transfer_ms: float | None


def features(obs: Observation, params: CostParams) -> Features:
    """Decompose one Observation with the model's specs (scales, link and overheads are left to the fit)."""
    route = obs.route
    cached_tokens = obs.decode_cached_tokens if route == Route.DECODE else obs.prefill_cached_tokens
    cached = max(0, min(cached_tokens, obs.prompt_tokens - 1))
    new = max(1, obs.prompt_tokens - cached)
    g = params.prefill_gpu if route == Route.PREFILL else params.decode_gpu  # unit scales
    flops_only = dataclasses.replace(g, hbm_tbps=math.inf)  # every byte term vanishes
    bytes_only = dataclasses.replace(g, bf16_tflops=math.inf)  # every FLOP term vanishes
    cols: dict[str, list[float]] = {
        k: [] for k in ("linear_c", "linear_m", "causal_c", "prefix_c", "floor_m", "fixed_s")
    }
    prefix = cached
    for n in roofline.chunk_sizes(new, params.chunk_size):
        c = roofline.prefill_chunk_breakdown(params.model, flops_only, n, prefix, params.eff)
        b = roofline.prefill_chunk_breakdown(params.model, bytes_only, n, prefix, params.eff)
        cols["linear_c"].append(c.linear_s)
        cols["linear_m"].append(b.linear_s)
        cols["causal_c"].append(c.attn_causal_s)
        cols["prefix_c"].append(c.attn_prefix_s)
        cols["floor_m"].append(b.prefix_read_s)
        cols["fixed_s"].append(c.overhead_s)
        prefix += n
    own_ms = 1e3 * sum(
        roofline.prefill_chunk_breakdown(params.model, g, n, p, params.eff).total_s
        for n, p in _chunk_prefixes(new, cached, params.chunk_size)
    )
    decode_load = ServerLoad(
        url="decode", running_reqs=obs.decode_running_reqs, running_kv_tokens=obs.decode_running_kv_tokens
    )
    step_ms = decode_step_ms(params, decode_load)
    timings = obs.server_timings or {}
    if "queue_ms" in timings:
        wait_ms = float(timings["queue_ms"])
    elif route == Route.PREFILL:
        service = params.prefill_service_ms if params.prefill_service_ms is not None else own_ms
        wait_ms = obs.prefill_queued_reqs * service
    else:
        wait_ms = 0.5 * step_ms
    return Features(
        route=route,
        **{k: tuple(v) for k, v in cols.items()},
        chunk_bytes=tuple(kv_chunk_bytes(params.model, new, cached, params.chunk_size))
        if route == Route.PREFILL
        else tuple(0 for _ in cols["fixed_s"]),
        per_token_ms=params.eff.per_token_overhead_us * obs.prompt_tokens / 1e3,
        wait_ms=wait_ms,
        admission_ms=0.5 * step_ms if route == Route.PREFILL else 0.0,
        ttft_ms=obs.ttft_ms,
        prefill_ms=_opt(timings.get("prefill_ms")),
        transfer_ms=_opt(timings.get("transfer_ms")) if route == Route.PREFILL else None,
    )


def _chunk_prefixes(new: int, cached: int, chunk_size: int) -> list[tuple[int, int]]:
    out, prefix = [], cached
    for n in roofline.chunk_sizes(new, chunk_size):
        out.append((n, prefix))
        prefix += n
    return out


def _opt(v: Any) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) and float(v) > 0 else None


@dataclass(frozen=True)
class FitResult:
    params: CostParams
    fitted: dict[str, float]  # the FITTED_FIELDS values
    active: tuple[str, ...]  # fields the window could inform (others stayed at the prior)
    n_obs: int
    n_prefill_route: int
    n_decode_route: int
    ttft_rel_err_median: float  # |predicted/measured - 1| over the window, after the fit
    ttft_rel_err_p90: float
    prior_rel_err_median: float  # the same with the prior parameters (what calibration bought)
    success: bool
    message: str

    def summary(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("params")
        out["active"] = list(self.active)
        # strict JSON (the router's responses refuse NaN)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


class _Batch:
    """A window of Features as padded numpy arrays, one row per observation, one column per chunk."""

    def __init__(self, feats: Sequence[Features]):
        k = max(len(f.fixed_s) for f in feats)

        def pad(attr: str) -> np.ndarray:
            return np.array([list(getattr(f, attr)) + [0.0] * (k - len(getattr(f, attr))) for f in feats], float)

        self.is_p = np.array([f.route == Route.PREFILL for f in feats])
        self.linear_c, self.linear_m, self.causal_c = pad("linear_c"), pad("linear_m"), pad("causal_c")
        self.prefix_c, self.floor_m, self.fixed, self.bytes = (
            pad("prefix_c"),
            pad("floor_m"),
            pad("fixed_s"),
            pad("chunk_bytes"),
        )
        self.host_ms = np.array([f.per_token_ms + f.wait_ms + f.admission_ms for f in feats])
        self.ttft = np.array([f.ttft_ms for f in feats])
        self.prefill_meas = np.array([f.prefill_ms if f.prefill_ms is not None else np.nan for f in feats])
        self.transfer_meas = np.array([f.transfer_ms if f.transfer_ms is not None else np.nan for f in feats])

    def predict(self, v: dict[str, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ttft_ms, prefill_ms, transfer_ms) for every row under parameter values `v`."""
        sc = np.where(self.is_p, v["prefill_compute_scale"], v["decode_compute_scale"])[:, None]
        sm = np.where(self.is_p, v["prefill_memory_scale"], v["decode_memory_scale"])[:, None]
        # the roofline's chunk time: each term the larger of its FLOP time and its byte floor (ppd/roofline.py)
        chunks = (
            np.maximum(self.linear_c / sc, self.linear_m / sm)
            + self.causal_c / sc
            + np.maximum(self.prefix_c / sc, self.floor_m / sm)
            + self.fixed
        )
        prefill_ms = 1e3 * chunks.sum(axis=1)
        # exposed transfer: the same recurrence as costmodel.exposed_transfer_s, across rows
        bw = v["link_bytes_per_s"]
        compute_end = np.zeros(len(chunks))
        send_end = np.zeros(len(chunks))
        for j in range(chunks.shape[1]):
            compute_end = compute_end + chunks[:, j]
            send_end = np.maximum(send_end, compute_end) + self.bytes[:, j] / bw
        exposed_ms = v["link_latency_ms"] + 1e3 * np.maximum(0.0, send_end - compute_end)
        transfer_ms = v["link_latency_ms"] + 1e3 * self.bytes.sum(axis=1) / bw
        overhead = np.where(self.is_p, v["prefill_route_overhead_ms"], v["decode_route_overhead_ms"])
        ttft = overhead + self.host_ms + prefill_ms + np.where(self.is_p, exposed_ms, 0.0)
        return ttft, prefill_ms, transfer_ms


def fit(
    feats: Sequence[Features],
    prior: CostParams,
    *,
    min_route_obs: int = 8,
    prior_weight: float = 0.05,
    loss_scale: float = 0.05,
) -> FitResult:
    """Robust least squares of the FITTED_FIELDS over a window; parameters a route never exercised keep the prior."""
    from scipy.optimize import least_squares  # deferred: importing scipy costs ~0.3 s

    prior_v = {f: float(getattr(prior, f)) for f in FITTED_FIELDS}
    n_p = sum(f.route == Route.PREFILL for f in feats)
    n_d = len(feats) - n_p
    n_transfer = sum(f.transfer_ms is not None for f in feats)
    # the link latency is a constant on every P-route TTFT, like the P-route overhead: only a measured transfer time
    # tells them apart, so without one it stays at the prior
    counts = {f: n_p for f in _P_FIELDS} | {f: n_d for f in _D_FIELDS} | {"link_latency_ms": n_transfer}
    active = tuple(f for f in FITTED_FIELDS if counts[f] >= min_route_obs)
    if not feats:
        return FitResult(prior, prior_v, (), 0, 0, 0, math.nan, math.nan, math.nan, False, "no observations")
    batch = _Batch(feats)

    def unpack(theta: np.ndarray) -> dict[str, float]:
        v = dict(prior_v)
        for name, t in zip(active, theta, strict=True):
            v[name] = math.exp(t) if name in _LOG_FIELDS else t * _ms_unit(prior_v[name])
        return v

    def pack(v: dict[str, float]) -> np.ndarray:
        return np.array([math.log(v[n]) if n in _LOG_FIELDS else v[n] / _ms_unit(prior_v[n]) for n in active])

    theta0 = pack(prior_v)
    lower = np.array([-math.inf if n in _LOG_FIELDS else 0.0 for n in active])

    def residuals(theta: np.ndarray) -> np.ndarray:
        v = unpack(theta)
        ttft, prefill_ms, transfer_ms = batch.predict(v)
        parts = [np.log(np.maximum(ttft, 1e-3) / batch.ttft)]
        for pred, meas in ((prefill_ms, batch.prefill_meas), (transfer_ms, batch.transfer_meas)):
            ok = ~np.isnan(meas)
            if ok.any():
                parts.append(np.log(np.maximum(pred[ok], 1e-3) / meas[ok]))
        parts.append(prior_weight * (theta - theta0))
        return np.concatenate(parts)

    prior_err = _rel_err(batch.predict(prior_v)[0], batch.ttft)
    if not active:
        return FitResult(prior, prior_v, (), len(feats), n_p, n_d, *prior_err, prior_err[0], False, "too few per route")
    sol = least_squares(residuals, theta0, bounds=(lower, np.full(len(active), math.inf)), loss="soft_l1",
                        f_scale=loss_scale, x_scale="jac")  # fmt: skip
    v = unpack(sol.x)
    med, p90 = _rel_err(batch.predict(v)[0], batch.ttft)
    params = prior.with_values(**v)
    return FitResult(params, v, active, len(feats), n_p, n_d, med, p90, prior_err[0], bool(sol.success), sol.message)


def _ms_unit(prior_ms: float) -> float:
    """Scale of a millisecond parameter in the solver (keeps every variable near 1)."""
    return max(abs(prior_ms), 1.0)


def _rel_err(pred: np.ndarray, meas: np.ndarray) -> tuple[float, float]:
    err = np.abs(pred / meas - 1.0)
    return float(np.median(err)), float(np.quantile(err, 0.9))


def warm_refit_worker() -> None:
    """Initializer of a process that runs `RefitJob.work`: import the fit's scipy once at its start."""
    import scipy.optimize  # noqa: F401


@dataclass(frozen=True)
class RefitJob:
    work: Callable[[], tuple[FitResult, dict[str, float | None]]]
    install: Callable[[tuple[FitResult, dict[str, float | None]]], FitResult]


def _fit_window(feats: list[Features], prior: CostParams, min_obs: int) -> tuple[FitResult, dict[str, float | None]]:
    """A refit's work: the fit and the per-route service times, over a window snapshot (module level: picklable)."""
    return fit(feats, prior, min_route_obs=min_obs), _service_times(feats, prior, min_obs)


class Calibrator:
    """Sliding window of observations and the latest fit. Deterministic: no clocks, refits every `refit_every`."""

    def __init__(self, prior: CostParams, *, window: int = 512, refit_every: int = 16, min_route_obs: int = 8):
        self.prior = prior
        self.params = prior
        self.window: deque[Features] = deque(maxlen=window)
        self.refit_every = max(1, refit_every)
        self.min_route_obs = min_route_obs
        self.seen = 0
        self.last: FitResult | None = None
        self.restored_from: dict[str, Any] | None = None
        self._prior_version = 0  # bumped by `restore`: a refit begun against an older prior is dropped

    def add(self, obs: Observation) -> bool:
        """Put one observation in the window without fitting; True when a refit is due (every `refit_every`)."""
        if obs.ttft_ms is None or not math.isfinite(obs.ttft_ms) or obs.ttft_ms <= 0 or obs.route == Route.COLOCATED:
            return False
        self.window.append(features(obs, self.params))
        self.seen += 1
        return self.seen % self.refit_every == 0

    def observe(self, obs: Observation) -> CostParams:
        """`add`, and refit inline when one is due (for callers without an event loop to protect)."""
        if self.add(obs):
            self.refit()
        return self.params

    def refit(self) -> FitResult:
        job = self.refit_job()
        return job.install(job.work())

    def refit_job(self) -> RefitJob:
        """A refit in two halves: `work` fits a snapshot of the window taken now (run it anywhere: a worker thread or
        process), `install(work's result)` makes the fit current (call it on the owner's thread, so the parameters
        never change under a decision) and returns it; a fit begun before `restore` is not installed."""
        work = functools.partial(_fit_window, list(self.window), self.prior, self.min_route_obs)
        return RefitJob(work, functools.partial(self._install, self._prior_version))

    def _install(self, version: int, outcome: tuple[FitResult, dict[str, float | None]]) -> FitResult:
        result, service = outcome
        if version == self._prior_version:
            self.last = result
            self.params = dataclasses.replace(result.params, **service)
        return result

    def describe(self) -> dict[str, Any]:
        return {
            "observations_seen": self.seen,
            "window": len(self.window),
            "window_max": self.window.maxlen,
            "refit_every": self.refit_every,
            "last_fit": self.last.summary() if self.last else None,
            "restored": self.restored_from is not None,
        }

    # persistence (plain dicts; the router does the file I/O with save_state / load_state)
    def state(self, key: dict[str, Any]) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "key": key,
            "fitted": {f: getattr(self.params, f) for f in FITTED_FIELDS},
            "service": {f: getattr(self.params, f) for f in ("prefill_service_ms", "decode_service_ms")},
            "observations_seen": self.seen,
            "last_fit": self.last.summary() if self.last else None,
        }

    def restore(self, state: dict[str, Any], key: dict[str, Any]) -> bool:
        """Start from a saved fit if it was made for the same deployment `key`; returns whether it was used."""
        if not state or state.get("version") != STATE_VERSION or state.get("key") != key:
            return False
        fitted = {f: float(v) for f, v in state.get("fitted", {}).items() if f in FITTED_FIELDS}
        service = {
            f: v for f, v in state.get("service", {}).items() if f in ("prefill_service_ms", "decode_service_ms")
        }
        # the restored fit becomes the prior: new observations refine it, parameters they cannot see keep it
        self.prior = self.prior.with_values(**fitted)
        self._prior_version += 1
        self.params = dataclasses.replace(self.prior, **service)
        self.restored_from = {"observations_seen": state.get("observations_seen"), "last_fit": state.get("last_fit")}
        return True


def _service_times(feats: Sequence[Features], prior: CostParams, min_obs: int) -> dict[str, float | None]:
    """Median backend-reported prefill time per route: the expected service of a request queued ahead."""
    out: dict[str, float | None] = {}
    for route, name in ((Route.PREFILL, "prefill_service_ms"), (Route.DECODE, "decode_service_ms")):
        vals = [f.prefill_ms for f in feats if f.route == route and f.prefill_ms is not None]
        out[name] = float(np.median(vals)) if len(vals) >= min_obs else getattr(prior, name)
    return out


def save_state(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write a calibration state as JSON, atomically (a crash leaves the old file)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=2, default=_json_default)
    os.replace(tmp, path)


def load_state(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A saved state, or None when there is none or it does not parse (calibration then starts from the specs)."""
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _json_default(o: Any) -> Any:
    if isinstance(o, float | np.floating):
        return float(o)
    if isinstance(o, np.integer):
        return int(o)
    raise TypeError(f"not JSON-able: {type(o).__name__}")
