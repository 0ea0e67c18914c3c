"""experiments/load.py, the pure parts: arrivals, outcome classification, summaries and the Markdown tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from experiments import load as L
from experiments.load import Outcome, StreamSeen

OPENAI_429 = {
    "error": {
        "message": "the router is at its in-flight limit",
        "type": "rate_limit_exceeded",
        "param": None,
        "code": None,
    }
}


def seen(**kw) -> StreamSeen:
    base = {"sent_s": 10.0, "status": 200, "first_token_s": 10.05, "end_s": 10.3, "finished": True, "done": True}
    return StreamSeen(**{**base, **kw})


def test_poisson_offsets_are_seeded_increasing_and_at_the_rate():
    a = L.poisson_offsets(4000, 20.0, seed=3)
    assert a == L.poisson_offsets(4000, 20.0, seed=3) and a != L.poisson_offsets(4000, 20.0, seed=4)
    assert a[0] == 0.0 and all(x < y for x, y in zip(a, a[1:], strict=False))
    assert len(a) / a[-1] == pytest.approx(20.0, rel=0.06)  # mean gap 1/R
    gaps = np.diff(a)
    assert np.std(gaps) == pytest.approx(np.mean(gaps), rel=0.1)  # exponential: std = mean (not a fixed pacing)
    assert L.poisson_offsets(0, 5.0, 0) == [] and L.poisson_offsets(3, math.inf, 0) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("kw", "outcome", "detail"),
    [
        ({}, Outcome.OK, ""),
        ({"status": 429, "error_body": OPENAI_429, "retry_after": "1"}, Outcome.REJECTED, "in-flight limit"),
        ({"status": 503, "error_body": OPENAI_429}, Outcome.REJECTED, "HTTP 503"),
        ({"status": 400, "error_body": OPENAI_429}, Outcome.ERROR, "HTTP 400"),
        ({"status": 502, "error_body": {"raw": "Bad Gateway"}}, Outcome.ERROR, "HTTP 502"),
        ({"error_event": '{"message": "backend failed"}', "finished": False}, Outcome.ERROR, "backend failed"),
        # everything below is LOST: the client cannot tell what happened to its request
        ({"error_event": "x", "done": False, "finished": False}, Outcome.LOST, "without [DONE]"),
        ({"status": 0, "transport_error": "ConnectError: refused"}, Outcome.LOST, "refused"),
        ({"timed_out": True}, Outcome.LOST, "deadline"),
        ({"done": False, "transport_error": "RemoteProtocolError: peer closed"}, Outcome.LOST, "peer closed"),
        ({"done": False}, Outcome.LOST, "before [DONE]"),
        ({"finished": False}, Outcome.LOST, "finish_reason"),
    ],
)
def test_classify(kw, outcome, detail):
    got, why = L.classify(seen(**kw))
    assert got is outcome
    assert detail in why


def test_to_sample_measures_from_the_send_and_records_lag():
    s = L.to_sample("router", 7, scheduled_s=2.0, t0=7.99, seen=seen())
    assert s.outcome == "ok" and s.index == 7
    assert s.ttft_ms == pytest.approx(50.0) and s.e2e_ms == pytest.approx(300.0)
    assert s.send_lag_ms == pytest.approx(10.0)  # sent at 10.0, scheduled at 7.99 + 2.0
    rejected = L.to_sample("router", 1, 0.0, 10.0, seen(status=429, error_body=OPENAI_429, end_s=10.002))
    assert rejected.ttft_ms is None and rejected.e2e_ms == pytest.approx(2.0)  # time to learn "rejected"
    assert rejected.openai_error_shape is True
    assert L.to_sample("router", 2, 0.0, 10.0, seen(status=502, error_body={"raw": "x"})).openai_error_shape is False
    assert L.to_sample("router", 3, 0.0, 10.0, seen()).openai_error_shape is None


def _samples() -> list[L.Sample]:
    out = []
    for i in range(100):  # OK requests with TTFT 1..100 ms and E2E 101..200 ms
        out.append(
            L.to_sample("router", i, 0.0, 0.0, seen(sent_s=0.0, first_token_s=(i + 1) / 1e3, end_s=(i + 101) / 1e3))
        )
    for i in range(5):
        out.append(
            L.to_sample(
                "router",
                100 + i,
                0.0,
                0.0,
                seen(sent_s=0.0, status=429, error_body=OPENAI_429, retry_after="1", end_s=0.001),
            )
        )
    out.append(L.to_sample("router", 200, 0.0, 0.0, seen(sent_s=0.0, done=False)))
    return out


def test_summarize_counts_every_request_once():
    s = L.summarize(_samples(), wall_s=10.0)
    assert (s["requests"], s["ok"], s["rejected"], s["error"], s["lost"]) == (106, 100, 5, 0, 1)
    assert s["ok"] + s["rejected"] + s["error"] + s["lost"] == s["requests"]
    assert s["ttft_ms"]["p50"] == pytest.approx(50.5) and s["ttft_ms"]["p99"] == pytest.approx(99.01)
    assert s["e2e_ms"]["count"] == 100  # only OK requests enter the latency percentiles
    assert s["reject_ms"]["p99"] == pytest.approx(1.0)
    assert s["rejected_with_retry_after"] == 5 and s["errors_openai_shape"] == 5
    assert s["errors_by_status"] == {"429": 5, "200": 1}
    assert s["throughput_ok_rps"] == pytest.approx(10.0)
    assert s["lost_details"] == ["stream ended before [DONE]"]


def test_overhead_is_router_minus_direct_per_percentile():
    samples = []
    for i in range(50):
        t = (i + 1) / 1e3
        samples.append(L.to_sample("router", 2 * i, 0, 0, seen(sent_s=0.0, first_token_s=t + 0.004, end_s=t + 0.104)))
        samples.append(L.to_sample("direct", 2 * i + 1, 0, 0, seen(sent_s=0.0, first_token_s=t, end_s=t + 0.1)))
    o = L.overhead(samples)
    assert o["ttft_ms_added"]["p50"] == pytest.approx(4.0) and o["ttft_ms_added"]["p99"] == pytest.approx(4.0)
    assert o["e2e_ms_added"]["p50"] == pytest.approx(4.0)
    assert o["router"]["ok"] == 50 and o["direct"]["ok"] == 50


def test_markdown_has_the_command_the_table_and_lost():
    report = L.LoadReport(
        spec=L.LoadSpec(requests=106, rate_rps=12.5),
        command="ppd load --config configs/local.yaml --requests 106 --rate 12.5",
        router_url="http://127.0.0.1:1",
        decode_url=None,
        time_scale=1.0,
        service_rate_rps=10.7,
        load=L.summarize(_samples(), 10.0),
        overhead=None,
    ).to_json()
    md = L.markdown("demo", report)
    assert "`ppd load --config configs/local.yaml --requests 106 --rate 12.5`" in md
    assert "| demo | 12.5 | 106 | 100 | 5 | 0 | **1** | 50 / 99 | 150 / 199 | 1 / 1 | 10.0 |" in md
    assert "Router overhead" not in md
    index = L.index_markdown({"demo": report, "again": report})
    assert index.count("| 12.5 | 106 |") == 2


def test_service_rate_follows_the_roofline_and_time_scale():
    cfg = {
        "backend": "emulated",
        "model": {"spec": "llama-3-8b"},
        "prefill": [{"gpu": "h200"}],
        "decode": [{"gpu": "h200"}],
        "emulator": {"chunk_size": 8192, "time_scale": 1.0},
    }
    fast = L.service_rate_rps(cfg, 4096)
    slow = L.service_rate_rps({**cfg, "emulator": {"chunk_size": 8192, "time_scale": 2.0}}, 4096)
    assert fast == pytest.approx(2 * slow, rel=0.01)
    assert L.service_rate_rps(cfg, 1024) > fast
    assert L.service_rate_rps({**cfg, "backend": "sglang"}, 4096) is None


@pytest.mark.parametrize("tokens", [64, 1024])
def test_prompts_have_the_exact_length_and_differ(tokens):
    maker = L.PromptMaker(tokens, seed=1)
    prompts = [maker.messages() for _ in range(20)]
    assert len({p[0]["content"] for p in prompts}) == 20
    assert {len(maker.input_ids(p)) for p in prompts} == {tokens}
