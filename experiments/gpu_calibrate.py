"""Fit the cost model's calibration offline from a measured sweep and write it where the router restores it.

    python -m experiments.gpu_calibrate --sweep results/h200x2/sweep-idle/sweep.json \
        --config configs/h200x2-llama3-8b.yaml --out configs/calibration/h200x2-llama3-8b.json

Every measured append of the sweep (each policy's, whatever route it took) and, with `--warmups`, every warm-up (a
fresh L-token prompt by the P-route) becomes one `Observation`, the same record the router feeds `auto` online; the fit
is `ppd.calibration.fit` (robust least squares of log TTFT residuals, weak pull toward the specs) with the prior the
config's deployment gives. TTFT is the router's own (`metrics.router_ttft_ms`, what the online calibration sees); the
warm-ups only have the client's. Real SGLang reports no per-request `prefill_ms` / `transfer_ms`, so as online, the
link bandwidth and latency are seen only through P-route TTFTs, and the link latency stays at the prior.

The output is `Calibrator.state(key)` with the key of the config's `auto` policy: the file `router.calibration_path`
names, restored by `Router` at start (`AutoPolicy.restore_state`) and refined online from there.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from typing import Any

from ppd.calibration import Calibrator, features, fit, save_state
from ppd.config import load_config
from ppd.costmodel import FITTED_FIELDS, CostParams
from ppd.policies.auto import AutoPolicy
from ppd.policies.base import Observation, Route
from router.routing import policy_context


def observations(doc: dict[str, Any], warmups: bool = False, background_streams: int = 0) -> list[Observation]:
    """One Observation per measured append (and warm-up) of a sweep document at the given load level."""
    out = []
    for r in doc["results"]:
        tc = r["test_case"]
        if not r.get("ok") or tc.get("background_streams", 0) != background_streams:
            continue
        m = r["metrics"]
        route = Route(r["route"])
        ttft = m.get("router_ttft_ms") or m.get("ttft_ms")
        L, m_new = tc["context_length"], tc["append_length"]
        router = r.get("router") or {}
        out.append(
            Observation(
                route=route,
                prompt_tokens=L + m_new,
                decode_cached_tokens=int(router.get("decode_cached_tokens") or L),
                prefill_cached_tokens=int(router.get("prefill_cached_tokens") or L),
                completion_tokens=int(m.get("output_tokens") or 0),
                ttft_ms=float(ttft),
                tpot_ms=m.get("tpot_ms"),
                e2e_ms=float(m.get("e2e_latency_ms") or ttft),
                kv_bytes=int(m.get("kv_bytes") or 0),
                decode_running_reqs=0,
                decode_running_kv_tokens=0,
                prefill_queued_reqs=0,
                server_timings={k: float(v) for k, v in (r.get("server_timings") or {}).items()},
            )
        )
        w = r.get("warmup") or {}
        if warmups and w.get("route") == "prefill" and w.get("ttft_ms"):
            out.append(
                Observation(Route.PREFILL, L, 0, 0, 1, float(w["ttft_ms"]), None, float(w["ttft_ms"]), 0, 0, 0, 0)
            )
    return out


def calibrate(obs: list[Observation], prior: CostParams, key: dict[str, Any], source: str) -> dict[str, Any]:
    """The calibration state (Calibrator.state format) fitted to `obs`, plus what the fit reports."""
    feats = [features(o, prior) for o in obs]
    result = fit(feats, prior, min_route_obs=8)
    cal = Calibrator(prior, window=max(512, len(obs)))
    cal.last = result
    cal.params = result.params
    cal.seen = len(obs)
    state = cal.state(key)
    state["source"] = source
    state["prior"] = {f: float(getattr(prior, f)) for f in FITTED_FIELDS}
    return state


def _per_route_err(obs: list[Observation], params: CostParams) -> dict[str, dict[str, float]]:
    """Median / p90 |predicted / measured - 1| of TTFT per route under `params` (the fit's own check)."""
    from ppd.calibration import _Batch  # the same composition the fit minimises

    out = {}
    for route in (Route.PREFILL, Route.DECODE):
        sel = [o for o in obs if o.route is route]
        if not sel:
            continue
        batch = _Batch([features(o, params) for o in sel])
        pred = batch.predict({f: float(getattr(params, f)) for f in FITTED_FIELDS})[0]
        errs = sorted(abs(p / o.ttft_ms - 1.0) for p, o in zip(pred, sel, strict=True))
        out[route.value] = {
            "n": len(sel),
            "median": errs[len(errs) // 2],
            "p90": errs[min(len(errs) - 1, math.ceil(0.9 * len(errs)) - 1)],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", required=True, nargs="+", help="sweep JSON file(s) (ppd sweep's <name>.json)")
    ap.add_argument("--config", required=True, help="the stack config whose router restores the file")
    ap.add_argument("--out", required=True, help="calibration JSON to write (router.calibration_path)")
    ap.add_argument("--warmups", action="store_true", help="also fit the warm-ups (fresh prompts, client TTFT)")
    ap.add_argument("--background-streams", type=int, default=0, help="load level of the points to fit (default 0)")
    args = ap.parse_args(argv)

    cfg = load_config(args.config)
    policy = AutoPolicy(policy_context(cfg))
    prior = policy.calibrator.prior
    obs: list[Observation] = []
    for path in args.sweep:
        obs += observations(json.loads(pathlib.Path(path).read_text()), args.warmups, args.background_streams)
    if not obs:
        print("no observations in the sweep(s)", file=sys.stderr)
        return 1
    source = " ".join(["python -m experiments.gpu_calibrate", *(argv if argv is not None else sys.argv[1:])])
    state = calibrate(obs, prior, policy.calibration_key(), source)
    fitted = prior.with_values(**state["fitted"])
    state["ttft_rel_err_by_route"] = {"prior": _per_route_err(obs, prior), "fitted": _per_route_err(obs, fitted)}
    save_state(args.out, state)
    lf = state["last_fit"]
    print(f"{len(obs)} observations ({lf['n_prefill_route']} P-route, {lf['n_decode_route']} D-route); "
          f"TTFT |pred/meas - 1| median {lf['prior_rel_err_median']:.3f} with the specs -> "
          f"{lf['ttft_rel_err_median']:.3f} fitted (p90 {lf['ttft_rel_err_p90']:.3f}); {lf['message']}")  # fmt: skip
    for f in FITTED_FIELDS:
        mark = "" if f in lf["active"] else "   (not informed: prior kept)"
        print(f"  {f:28s} spec {state['prior'][f]:>14.6g}   fitted {state['fitted'][f]:>14.6g}{mark}")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
