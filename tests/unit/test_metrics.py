"""The one metric definition (experiments/metrics.py) on synthetic token timestamps."""

import math

import pytest

from experiments import metrics as M


def timing(arrival, first, tpot_s, n, end=None):
    return M.RequestTiming(arrival, tuple(first + k * tpot_s for k in range(n)), n, end)


def test_ttft_tpot_e2e_from_timestamps():
    t = timing(10.0, 10.25, 0.02, 11)  # first token 250 ms after arrival, then 10 gaps of 20 ms
    m = M.request_metrics(t)
    assert m.ttft_ms == pytest.approx(250.0)
    assert m.tpot_ms == pytest.approx(20.0)
    assert m.e2e_ms == pytest.approx(250.0 + 200.0)
    assert m.n_tokens == 11


def test_time_scale_gives_emulated_ms():
    t = timing(0.0, 1.0, 0.1, 5)  # wall: 1000 ms TTFT, 100 ms TPOT
    m = M.request_metrics(t, time_scale=4.0)
    assert m.ttft_ms == pytest.approx(250.0)
    assert m.tpot_ms == pytest.approx(25.0)
    assert m.e2e_ms == pytest.approx(350.0)


def test_chunked_stream_uses_token_count():
    # 3 chunks carrying 9 tokens: TPOT divides the first..last span by tokens - 1
    t = M.RequestTiming(0.0, (0.1, 0.2, 0.5), n_tokens=9)
    assert M.tpot_ms(t) == pytest.approx(400.0 / 8)


def test_end_time_overrides_last_token_for_e2e():
    t = timing(0.0, 0.1, 0.01, 3, end=0.5)
    assert M.e2e_ms(t) == pytest.approx(500.0)


def test_single_token_has_no_tpot_and_passes_tpot_slo():
    t = timing(0.0, 0.05, 0.0, 1)
    m = M.request_metrics(t)
    assert math.isnan(m.tpot_ms)
    assert M.meets_slo(m, M.Slo(ttft_ms=100, tpot_ms=1))
    assert not M.meets_slo(m, M.Slo(ttft_ms=10, tpot_ms=1))


def test_no_tokens_is_nan_and_fails_slo():
    t = M.RequestTiming(0.0, ())
    m = M.request_metrics(t)
    assert math.isnan(m.ttft_ms) and math.isnan(m.e2e_ms)
    assert not M.meets_slo(m, M.Slo(1e9, 1e9))


def test_goodput_counts_requests_meeting_both_slos():
    slo = M.Slo(ttft_ms=200, tpot_ms=30)
    ms = [
        M.request_metrics(timing(0, 0.1, 0.02, 10)),  # ok
        M.request_metrics(timing(0, 0.3, 0.02, 10)),  # TTFT miss
        M.request_metrics(timing(0, 0.1, 0.05, 10)),  # TPOT miss
        M.request_metrics(timing(0, 0.15, 0.03, 10)),  # both at the limit: ok
    ]
    assert M.goodput_rps(ms, duration_s=2.0, slo=slo) == pytest.approx(1.0)


def test_percentiles_ignore_nan():
    vals = [1.0, 2.0, 3.0, 4.0, float("nan")]
    assert M.percentile(vals, 50) == pytest.approx(2.5)
    assert M.percentile(vals, 100) == pytest.approx(4.0)
    assert math.isnan(M.percentile([], 50))
    d = M.describe(vals)
    assert d["count"] == 4 and d["mean"] == pytest.approx(2.5)


def test_gaps_and_windows():
    times = [0.00, 0.01, 0.02, 0.10, 0.11, 0.12]  # one 80 ms stall between 0.02 and 0.10
    assert M.gaps_ms(times) == pytest.approx([10, 10, 80, 10, 10])
    assert M.gaps_in_window_ms(times, 0.05, 0.06) == pytest.approx([80])
    assert M.gaps_within_ms(times, 0.0, 0.03) == pytest.approx([10, 10])


def test_stream_delay_is_stall_beyond_baseline():
    times = [0.00, 0.01, 0.02, 0.10, 0.11, 0.12]
    # window around the stall: tokens 0.02 (before) .. 0.10 (after): 1 gap of 80 ms vs 10 ms baseline
    assert M.stream_delay_ms(times, 0.03, 0.09, baseline_tpot_ms=10.0) == pytest.approx(70.0)
    # a window with no stall costs nothing
    assert M.stream_delay_ms(times, 0.105, 0.115, baseline_tpot_ms=10.0) == pytest.approx(0.0, abs=1e-9)
    # client jitter (a token late then the next on time) does not bias it
    jitter = [0.00, 0.01, 0.025, 0.03, 0.04]
    assert M.stream_delay_ms(jitter, 0.005, 0.035, baseline_tpot_ms=10.0) == pytest.approx(0.0, abs=1e-9)
    # a stream that does not span the window: undefined
    assert math.isnan(M.stream_delay_ms(times, -1.0, 0.05, 10.0))


def test_pace_is_a_clipped_mean():
    # steady 10 ms steps, one 20 ms gap (a token without text: two steps in one chunk), one 60 ms disturbance
    gaps = [10.0] * 14 + [20.0, 60.0]
    assert M.pace_ms(gaps) == pytest.approx((14 * 10 + 20 + 22) / 16)  # 60 clipped to 2.2 x median
    assert M.pace_ms([10.0, 20.0]) == pytest.approx(15.0)  # nothing to clip
    assert math.isnan(M.pace_ms([]))
