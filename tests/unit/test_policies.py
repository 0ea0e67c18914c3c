"""auto and threshold policies: cheaper route, hysteresis, fallbacks, calibration hook, describe()."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ppd.costmodel import synthetic_input
from ppd.policies import PolicyContext, Route, ServerLoad, make_policy, policy_names
from ppd.policies.auto import AutoPolicy
from ppd.policies.base import Observation
from ppd.policies.threshold import ThresholdPolicy

CTX = PolicyContext()  # H200 -> H200, NVLink


def test_registry_has_all_four():
    assert {"prefill", "decode", "auto", "threshold"} <= set(policy_names())
    assert isinstance(make_policy("auto", context=CTX), AutoPolicy)
    assert isinstance(make_policy("threshold", context=CTX, min_uncached_tokens=1000), ThresholdPolicy)


def test_auto_idle_identical_gpus_goes_decode():
    d = AutoPolicy(CTX).decide(synthetic_input(16384, 16))
    assert (d.route, d.reason) == (Route.DECODE, "cheaper")
    assert d.cache_rate == pytest.approx(16384 / 16400)
    assert {s.route for s in d.scores} == {Route.PREFILL, Route.DECODE}


def test_auto_busy_decode_server_goes_prefill():
    """NOTES.md: with 32 streams decoding, a 2048-token append on D stalls all of them for ~its prefill time."""
    d = AutoPolicy(CTX).decide(synthetic_input(16384, 2048, background_streams=32))
    assert (d.route, d.reason) == (Route.PREFILL, "cheaper")


def test_auto_interference_weight_zero_ignores_the_others():
    d = AutoPolicy(CTX, interference_weight=0.0).decide(synthetic_input(16384, 2048, background_streams=32))
    assert d.route is Route.DECODE


def test_auto_slow_link_high_cache_rate_goes_decode_even_under_load():
    policy = AutoPolicy(dataclasses.replace(CTX, link="tcp-25g"))
    assert policy.decide(synthetic_input(16384, 16, background_streams=8)).route is Route.DECODE


def test_auto_hysteresis_keeps_the_previous_route_for_small_differences():
    x = synthetic_input(16384, 16)  # idle: D cheaper by ~10 ms of ~90
    p, d = AutoPolicy(CTX).score(x)
    margin = p.cost_ms - d.cost_ms
    assert 0 < margin < 20
    sticky = AutoPolicy(CTX, hysteresis_ms=margin + 1, hysteresis_rel=0.0)
    kept = sticky.decide(dataclasses.replace(x, previous_route=Route.PREFILL))
    assert (kept.route, kept.reason) == (Route.PREFILL, "hysteresis")
    # the cheaper route needs no hysteresis, and a bigger margin flips
    assert sticky.decide(dataclasses.replace(x, previous_route=Route.DECODE)).route is Route.DECODE
    loose = AutoPolicy(CTX, hysteresis_ms=margin - 1, hysteresis_rel=0.0)
    flipped = loose.decide(dataclasses.replace(x, previous_route=Route.PREFILL))
    assert (flipped.route, flipped.reason) == (Route.DECODE, "cheaper")
    # the relative threshold counts too
    rel = AutoPolicy(CTX, hysteresis_ms=0.0, hysteresis_rel=(margin + 1) / p.cost_ms)
    assert rel.decide(dataclasses.replace(x, previous_route=Route.PREFILL)).reason == "hysteresis"


@pytest.mark.parametrize(
    ("prefill", "reason"),
    [
        (None, "no-prefill"),
        (ServerLoad("p", healthy=False), "prefill-unhealthy"),
        (ServerLoad("p", inflight=256, max_inflight=256), "prefill-saturated"),
    ],
)
@pytest.mark.parametrize("name", ["auto", "threshold"])
def test_fallback_to_decode_when_prefill_cannot_run(name, prefill, reason):
    x = dataclasses.replace(synthetic_input(512, 8192, background_streams=32), prefill=prefill)
    d = make_policy(name, context=CTX).decide(x)
    assert (d.route, d.reason) == (Route.DECODE, reason)


def test_auto_prefers_prefill_when_decode_is_saturated():
    x = synthetic_input(16384, 16)
    x = dataclasses.replace(x, decode=dataclasses.replace(x.decode, inflight=8, max_inflight=8))
    d = AutoPolicy(CTX).decide(x)
    assert (d.route, d.reason) == (Route.PREFILL, "decode-saturated")


def test_auto_deep_prefill_queue_pushes_to_decode():
    x = synthetic_input(512, 8192, background_streams=8)
    assert AutoPolicy(CTX).decide(x).route is Route.PREFILL
    queued = dataclasses.replace(x, prefill=ServerLoad("p", queued_reqs=20, running_reqs=1, inflight=21))
    assert AutoPolicy(CTX).decide(queued).route is Route.DECODE


def test_auto_router_counts_bound_is_opt_in():
    """By default the load the router passes in counts (it includes other clients' requests); with
    router_counts_bound=True (only one router, no direct traffic) the router's own in-flight counts cap it."""
    x = synthetic_input(512, 8192, background_streams=8)
    stale = dataclasses.replace(x, prefill=ServerLoad("p", queued_reqs=20, running_reqs=1, inflight=0))
    assert AutoPolicy(CTX).decide(stale).route is Route.DECODE  # 20 queued on P: the D-route
    bounded = AutoPolicy(CTX, router_counts_bound=True)
    assert bounded.decide(stale).route is Route.PREFILL
    assert bounded.score(stale)[0].terms["queue_ms"] == 0.0
    # decode side: 8 streams in the metrics, none of them through this router (inflight 0)
    d_score = AutoPolicy(CTX).score(x)[1]
    assert d_score.terms["interference_ms"] == pytest.approx(8 * d_score.terms["prefill_ms"])
    fewer = dataclasses.replace(x, decode=dataclasses.replace(x.decode, inflight=2))
    d_bounded = bounded.score(fewer)[1]
    assert d_bounded.terms["interference_ms"] == pytest.approx(2 * d_bounded.terms["prefill_ms"])


def test_auto_unknown_param_is_an_error():
    with pytest.raises(ValueError, match="unknown cost-model parameter"):
        make_policy("auto", context=CTX, no_such_knob=1)


def test_auto_cost_overrides_and_describe_are_json():
    policy = make_policy("auto", context=CTX, link_bytes_per_s=1e9, decode_route_overhead_ms=5.0)
    desc = policy.describe()
    json.dumps(desc, allow_nan=False)
    assert desc["params"]["link_bytes_per_s"] == 1e9
    assert desc["params"]["decode_route_overhead_ms"] == 5.0
    assert desc["calibration"]["observations_seen"] == 0
    assert "fit_ttft_rel_err_median" not in policy.gauges()


def _obs(route: Route, ttft_ms: float, L: int = 4096, m: int = 256) -> Observation:
    return Observation(route, L + m, L, L, 8, ttft_ms, 5.0, ttft_ms + 40, 0, 0, 0, 0, {})


def test_auto_observe_calibrates_toward_what_it_measured():
    """Every D-route append takes 3x the spec prediction: after a refit the policy predicts slower D-routes."""
    policy = AutoPolicy(CTX, refit_every=16)
    before = policy.score(synthetic_input(4096, 256))[1].cost_ms
    for L, m in [(L, m) for L in (1024, 4096, 16384) for m in (16, 256, 2048)] * 2:
        x = synthetic_input(L, m)
        policy.observe(_obs(Route.DECODE, 3 * _d_ttft(x), L, m))
    after = policy.score(synthetic_input(4096, 256))[1].cost_ms
    assert after > 2 * before
    assert policy.gauges()["fit_observations"] == 16  # refit at the 16th of 18
    json.dumps(policy.describe(), allow_nan=False)


def _d_ttft(x) -> float:
    return AutoPolicy(CTX, calibrate=False).score(x)[1].cost_ms


def test_auto_state_round_trip():
    a = AutoPolicy(CTX, refit_every=8)
    for L, m in [(L, m) for L in (1024, 16384) for m in (16, 2048)] * 4:
        a.observe(_obs(Route.DECODE, 2 * _d_ttft(synthetic_input(L, m)), L, m))
    state = json.loads(json.dumps(a.export_state()))
    b = AutoPolicy(CTX)
    assert b.restore_state(state)
    x = synthetic_input(4096, 256)
    assert b.score(x)[1].cost_ms == pytest.approx(a.score(x)[1].cost_ms)
    assert not AutoPolicy(dataclasses.replace(CTX, decode_gpu="h20")).restore_state(state)
    assert not AutoPolicy(CTX, calibrate=False).restore_state(state)


def test_threshold_rule():
    t = ThresholdPolicy(CTX, min_uncached_tokens=512, max_prefill_queue=2)
    assert t.decide(synthetic_input(4096, 512)).route is Route.DECODE  # not above N
    d = t.decide(synthetic_input(4096, 513))
    assert (d.route, d.reason) == (Route.PREFILL, "above-threshold")
    busy = dataclasses.replace(synthetic_input(4096, 2048), prefill=ServerLoad("p", queued_reqs=2))
    assert t.decide(busy).reason == "prefill-queue-full"
    json.dumps(t.describe())


def test_threshold_counts_uncached_tokens_on_the_chosen_side():
    # the decode server holds 4096 (prompt + earlier answer), the prefill server only 3700 (no answer)
    x = synthetic_input(4096, 300, prefill_cached_tokens=3700)
    assert ThresholdPolicy(CTX, uncached_on="decode").decide(x).route is Route.DECODE  # m = 300
    assert ThresholdPolicy(CTX, uncached_on="prefill").decide(x).route is Route.PREFILL  # 696 to compute
    with pytest.raises(ValueError):
        ThresholdPolicy(CTX, uncached_on="both")
