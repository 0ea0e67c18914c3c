"""`auto`: route each append-prefill to the cheaper route by the cost model, calibrated online.

Order of rules: a route that cannot run is not taken (`availability_fallback`: no/unhealthy/saturated prefill server
-> D); a saturated decode server with a healthy prefill server -> P (the D-route would add prefill work to a server
already at its admission limit); otherwise the cheaper route by `ppd.costmodel.route_costs`, except that a conversation
keeps its previous route unless the other one is cheaper by more than max(hysteresis_ms, hysteresis_rel x cost), so
near-ties do not flap.

Backend metrics are polled (every 0.5 s by default); the router corrects them between polls with the requests it
started and saw end since (router/backends.py), so a request that just finished does not linger as queued or running,
and load from other clients (other routers, traffic sent to the servers directly) still counts.
`router_counts_bound=True` caps them by the router's own in-flight counts instead: only right when every request
reaches the backends through this one router (with direct traffic it would hide all of it: on 2 x H200, 32 streams
sent straight to the decode server became 0 running streams and `auto` took the D-route into them).

Params (router.policy_params): interference_weight, hysteresis_ms, hysteresis_rel, router_counts_bound, calibrate,
calibration_window, refit_every, min_route_obs, and any numeric CostParams field (e.g. link_bytes_per_s,
decode_route_overhead_ms) to pin a starting value.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ppd.calibration import Calibrator, RefitJob
from ppd.costmodel import FITTED_FIELDS, CostParams, route_costs
from ppd.policies.base import (
    Decision,
    Observation,
    PolicyContext,
    Route,
    RouteScore,
    RoutingInput,
    ServerLoad,
    availability_fallback,
)


def _bound(load: ServerLoad) -> ServerLoad:
    queued = min(load.queued_reqs, load.inflight)
    running = min(load.running_reqs, load.inflight - queued)
    if (queued, running) == (load.queued_reqs, load.running_reqs):
        return load
    kv = load.running_kv_tokens * running // load.running_reqs if load.running_reqs else 0
    return dataclasses.replace(load, queued_reqs=queued, running_reqs=running, running_kv_tokens=kv)


class AutoPolicy:
    name = "auto"

    def __init__(
        self,
        context: PolicyContext | None = None,
        *,
        interference_weight: float = 1.0,
        hysteresis_ms: float = 2.0,
        hysteresis_rel: float = 0.05,
        router_counts_bound: bool = False,
        calibrate: bool = True,
        calibration_window: int = 512,
        refit_every: int = 16,
        min_route_obs: int = 8,
        **cost_overrides: float,
    ):
        self.context = context or PolicyContext()
        self.hysteresis_ms = float(hysteresis_ms)
        self.hysteresis_rel = float(hysteresis_rel)
        self.router_counts_bound = bool(router_counts_bound)
        prior = CostParams.from_context(self.context, interference_weight=float(interference_weight), **cost_overrides)
        self.calibrator = (
            Calibrator(prior, window=calibration_window, refit_every=refit_every, min_route_obs=min_route_obs)
            if calibrate
            else None
        )
        self._static_params = prior

    @property
    def params(self) -> CostParams:
        return self.calibrator.params if self.calibrator else self._static_params

    def score(self, x: RoutingInput) -> tuple[RouteScore, ...]:
        return route_costs(self._bounded(x), self.params)

    def _bounded(self, x: RoutingInput) -> RoutingInput:
        """Stale metrics bounded by the router's own in-flight counts (see module doc)."""
        if not self.router_counts_bound:
            return x
        return dataclasses.replace(
            x, prefill=_bound(x.prefill) if x.prefill is not None else None, decode=_bound(x.decode)
        )

    def decide(self, x: RoutingInput) -> Decision:
        fallback = availability_fallback(x, self.name)
        if fallback is not None:
            return fallback
        scores = self.score(x)
        p, d = scores
        if x.decode.saturated:
            return Decision(Route.PREFILL, self.name, "decode-saturated", x.cache_rate, scores)
        best, other = (p, d) if p.cost_ms < d.cost_ms else (d, p)
        prev = x.previous_route
        if prev == other.route:
            margin = other.cost_ms - best.cost_ms
            if margin <= max(self.hysteresis_ms, self.hysteresis_rel * other.cost_ms):
                detail = f"kept {prev.value}: {margin:.1f} ms cheaper elsewhere is within hysteresis"
                return Decision(prev, self.name, "hysteresis", x.cache_rate, scores, detail)
        return Decision(best.route, self.name, "cheaper", x.cache_rate, scores)

    def observe(self, obs: Observation) -> None:
        if self.calibrator is not None:
            self.calibrator.observe(obs)

    def observe_deferred(self, obs: Observation) -> RefitJob | None:
        """`observe` for a caller with an event loop: a refit that is due comes back as a job instead of running here.
        Its `work` fits a snapshot of the window (pure, picklable: run it in a worker process) and its `install`
        makes the fit current (call it on the loop). `decide` is untouched until that install."""
        if self.calibrator is None or not self.calibrator.add(obs):
            return None
        return self.calibrator.refit_job()

    # persistence: the router reads/writes router.calibration_path with ppd.calibration.load_state / save_state
    def calibration_key(self) -> dict[str, Any]:
        """What a saved fit is valid for: the same model, GPUs, link and chunking."""
        c = self.context
        return {
            "model": c.model,
            "prefill_gpu": c.prefill_gpu,
            "decode_gpu": c.decode_gpu,
            "link": c.link,
            "link_gbytes_per_s": c.link_gbytes_per_s,
            "chunk_size": c.chunk_size,
        }

    def export_state(self) -> dict[str, Any] | None:
        return self.calibrator.state(self.calibration_key()) if self.calibrator else None

    def restore_state(self, state: dict[str, Any] | None) -> bool:
        return bool(self.calibrator and state and self.calibrator.restore(state, self.calibration_key()))

    def describe(self) -> dict[str, Any]:
        """JSON-able: the parameters in use, the priors from the specs, and the calibration state."""
        return {
            "policy": self.name,
            "context": self.calibration_key(),
            "hysteresis_ms": self.hysteresis_ms,
            "hysteresis_rel": self.hysteresis_rel,
            "router_counts_bound": self.router_counts_bound,
            "params": self.params.summary(),
            "prior": {f: getattr(self._static_params, f) for f in FITTED_FIELDS},
            "calibration": self.calibrator.describe() if self.calibrator else None,
        }

    def gauges(self) -> dict[str, float]:
        """Flat numbers for Prometheus (ppd_model_<name>): the fitted parameters and the fit's error."""
        out = {f: float(getattr(self.params, f)) for f in FITTED_FIELDS}
        last = self.calibrator.last if self.calibrator else None
        if last is not None:
            out["fit_ttft_rel_err_median"] = last.ttft_rel_err_median
            out["fit_ttft_rel_err_p90"] = last.ttft_rel_err_p90
            out["fit_observations"] = float(last.n_obs)
        return out
