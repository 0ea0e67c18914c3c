"""`ppd bench` pieces without processes: the metric path (experiments/metrics.py) on synthetic token timestamps, the
same for every system and for the simulator; token-exact chat messages; traces; reports; the sim-vs-emu helpers."""

import json
import math
import random

import pytest

from experiments import bench as B
from experiments import metrics as M
from experiments.bench_report import bench_markdown, bench_plot
from experiments.client import StreamResult
from experiments.sim_vs_emu import compare, parse_rows, pct
from ppd.config import REPO_ROOT, load_config
from ppd.simulate.cluster import ClusterSpec, simulate
from ppd.simulate.summary import summarize as sim_summarize
from ppd.simulate.trace import TraceRequest
from ppd.tokenizer import ChatTokenizer


def stream(arrival: float, first: float, gap: float, n: int, prompt: int = 100) -> StreamResult:
    times = [first + k * gap for k in range(n)]
    return StreamResult(
        arrival_s=arrival,
        status=200,
        token_times_s=times,
        end_s=times[-1] + 0.001,
        text="x",
        usage={"completion_tokens": n, "prompt_tokens": prompt, "prompt_tokens_details": {"cached_tokens": 40}},
        ppd={"route": "prefill"},
    )


def test_record_uses_the_shared_metric_definitions():
    tr = TraceRequest(2.0, 100, 11, "c0")
    t0, sched = 1000.0, 1002.0
    # sent 5 ms late, first token 250 ms after the scheduled issue, then 10 gaps of 20 ms
    res = stream(arrival=sched + 0.005, first=sched + 0.25, gap=0.02, n=11)
    rec = B.record_of(tr, 100, sched, t0, res, time_scale=1.0)
    assert rec.ttft_ms == pytest.approx(250.0)  # from the scheduled issue time, not the send
    assert rec.tpot_ms == pytest.approx(20.0)
    assert rec.send_lag_ms == pytest.approx(5.0)
    assert rec.issue_s == pytest.approx(2.0)
    assert rec.first_token_s == pytest.approx(2.25) and rec.last_token_s == pytest.approx(2.45)
    timing = M.RequestTiming(sched, tuple(res.token_times_s), 11, res.end_s)
    assert rec.metrics() == M.request_metrics(timing)
    assert (rec.prompt_tokens, rec.cached_tokens, rec.route) == (100, 40, "prefill")


def test_time_scale_reports_emulated_ms():
    tr = TraceRequest(1.0, 100, 5, "c0")
    sched = 10.0 + 1.0 * 4
    rec = B.record_of(tr, 100, sched, 10.0, stream(sched, sched + 1.0, 0.1, 5), time_scale=4.0)
    assert rec.ttft_ms == pytest.approx(250.0)
    assert rec.tpot_ms == pytest.approx(25.0)
    assert rec.issue_s == pytest.approx(1.0)


def test_failed_request_is_a_miss():
    tr = TraceRequest(0.0, 100, 5, "c0")
    res = StreamResult(arrival_s=0.0, status=500, error="boom")
    rec = B.record_of(tr, 100, 0.0, 0.0, res, 1.0)
    assert not rec.ok and math.isnan(rec.ttft_ms) and rec.error == "boom"
    good = B.record_of(tr, 100, 0.0, 0.0, stream(0.0, 0.05, 0.01, 5), 1.0)
    s = B.summarize([rec, good], M.Slo(100.0, 20.0), window_s=2.0)
    assert s["requests"] == 2 and s["ok"] == 1 and s["errors"] == 1
    assert s["goodput_rps"] == pytest.approx(0.5) and s["slo_attainment"] == pytest.approx(0.5)


def test_summary_matches_experiments_metrics():
    rng = random.Random(0)
    recs = []
    for i in range(40):
        sched = i * 0.25
        res = stream(sched, sched + rng.uniform(0.02, 0.4), rng.uniform(0.004, 0.03), rng.randint(2, 50))
        recs.append(B.record_of(TraceRequest(sched, 100, 50, f"c{i}"), 100, sched, 0.0, res, 1.0))
    slo = M.Slo(250.0, 15.0)
    s = B.summarize(recs, slo, window_s=10.0)
    ms = [r.metrics() for r in recs]
    assert s["goodput_rps"] == pytest.approx(M.goodput_rps(ms, 10.0, slo))
    assert s["ttft_p50_ms"] == pytest.approx(M.percentile([m.ttft_ms for m in ms], 50))
    assert s["tpot_p99_ms"] == pytest.approx(M.percentile([m.tpot_ms for m in ms], 99))
    makespan = max(r.last_token_s for r in recs)
    assert s["decode_tokens_per_s"] == pytest.approx(sum(r.output_tokens for r in recs) / makespan)
    assert s["cache_hit_frac"] == pytest.approx(0.4)


def test_every_system_and_the_simulator_share_the_metric_code():
    """The same timestamps give the same numbers whatever served them: a bench record (any system) and a simulated
    request both go through experiments.metrics.request_metrics."""
    tr = TraceRequest(0.0, 512, 9, "c0")
    spec = ClusterSpec(prefill=1, decode=1, request_overhead=False)
    sim = simulate([tr], spec)
    (req,) = sim.requests
    res = stream(0.0, req.first_token_s, (req.last_token_s - req.first_token_s) / 8, 9)
    rec = B.record_of(tr, 512, 0.0, 0.0, res, 1.0)
    (sim_rec,) = B.sim_records(sim)
    assert sim_rec.ttft_ms == pytest.approx(rec.ttft_ms) and sim_rec.tpot_ms == pytest.approx(rec.tpot_ms)
    slo = M.Slo(1000.0, 50.0)
    ours = B.summarize([sim_rec], slo, 1.0)
    theirs = sim_summarize(sim, slo)
    assert ours["ttft_p50_ms"] == pytest.approx(theirs["ttft_ms"]["p50"])
    assert ours["tpot_p50_ms"] == pytest.approx(theirs["tpot_ms"]["p50"])


# --- token-exact chat messages ---


@pytest.fixture(scope="module")
def tok():
    return ChatTokenizer.load()


@pytest.fixture(scope="module")
def texts(tok):
    return B.ChatTexts(tok)


def test_first_turn_has_exactly_the_trace_length(tok, texts):
    for n in (16, 128, 2048):
        msgs, expected = texts.first_turn(TraceRequest(0.0, n, 8, f"c{n}"), "nonce")
        assert expected == n == len(tok.encode_chat(msgs))


def test_shared_prefix_is_token_identical(tok, texts):
    a = TraceRequest(0.0, 1000, 8, "a", prefix_id="doc", prefix_tokens=700)
    b = TraceRequest(0.0, 900, 8, "b", prefix_id="doc", prefix_tokens=700)
    ma, ea = texts.first_turn(a, "n")
    mb, eb = texts.first_turn(b, "n")
    ia, ib = tok.encode_chat(ma), tok.encode_chat(mb)
    assert (len(ia), len(ib)) == (ea, eb) == (1000, 900)
    assert ia[:700] == ib[:700] and ia[:720] != ib[:720]  # the user messages differ (after their header)
    other, _ = texts.first_turn(a, "another-nonce")  # a different run shares nothing beyond the template
    assert tok.encode_chat(other)[:700] != ia[:700]


def test_next_turn_extends_prompt_and_answer(tok, texts):
    t0 = TraceRequest(0.0, 300, 20, "c", turn=0)
    t1 = TraceRequest(5.0, 300 + 20 + 60, 10, "c", turn=1, think_s=1.0)
    msgs, e0 = texts.first_turn(t0, "n")
    ids0 = tok.encode_chat(msgs)
    answer = [int(i) for i in random.Random(1).sample(range(1000, 20000), 20)]
    text = "the answer text"
    tok.remember_output(text, answer)  # what the router does with the ids it returned
    history = msgs + [{"role": "assistant", "content": text}]
    msgs1, e1 = texts.next_turn(history, e0, t0, t1, "n")
    ids1 = tok.encode_chat(msgs1)
    assert e1 == len(ids1) == 380
    assert ids1[: len(ids0) + 20] == ids0 + answer  # the decode server's cached prompt + output is a prefix


def test_cell_traces_are_seeded_poisson():
    s = B.BenchSettings(duration_s=200.0)
    tr = B.bench_trace(s, "heavy-light", 4.0)
    assert tr == B.bench_trace(s, "heavy-light", 4.0)
    assert {(r.prompt_tokens, r.output_tokens) for r in tr} == {(2048, 32)}
    assert all(0 <= r.arrival_s < 200.0 for r in tr)
    assert 600 < len(tr) < 1000  # ~800 at 4 req/s
    assert len({r.conversation_id for r in tr}) == len(tr)
    multi = B.bench_trace(replace_duration(s, 60.0), "multiturn", 4.0)
    assert max(r.turn for r in multi) > 0


def replace_duration(s: B.BenchSettings, d: float) -> B.BenchSettings:
    from dataclasses import replace

    return replace(s, duration_s=d)


def test_systems_and_cells_validate():
    labels = [s.label for s in B.systems_for(("colocated", "disaggregated"), ("prefill", "auto"))]
    assert labels == ["colocated", "pd-prefill", "pd-auto"]
    with pytest.raises(ValueError, match="unknown mode"):
        B.systems_for(("split",), ())
    with pytest.raises(ValueError, match="unknown cell"):
        B.BenchSettings().cell("medium")


def test_cluster_spec_mirrors_the_configs():
    colo = B.cluster_spec(load_config(REPO_ROOT / "configs" / "local-colocated.yaml"), None)
    pd = B.cluster_spec(load_config(REPO_ROOT / "configs" / "local.yaml"), "auto")
    big = B.cluster_spec(load_config(REPO_ROOT / "configs" / "local-2p2d.yaml"), "prefill")
    assert (colo.ratio, pd.ratio, big.ratio) == ("0:2", "1:1", "2:2")
    assert colo.gpus == pd.gpus == 2 and big.gpus == 4
    assert pd.policy == "auto" and pd.link_sharing == "none" and pd.gpu == "h200"


# --- reports ---


def fake_doc() -> dict:
    s = B.BenchSettings(cells=("light-light",), rates=(1.0, 2.0))
    doc = B.BenchDoc(s, "ppd bench --cells light-light --rates 1,2", {"disaggregated": "configs/local.yaml"})
    doc.stacks["hardware"] = "2 x emulated h200, llama-3-8b"
    for system in B.systems_for(s.modes, s.policies):
        for rate in s.rates:
            recs = [
                B.record_of(
                    TraceRequest(i / rate, 128, 32, f"c{i}"),
                    128,
                    i / rate,
                    0.0,
                    stream(i / rate, i / rate + 0.05, 0.005, 32),
                    1.0,
                )
                for i in range(5)
            ]
            B._add_run(doc, system, "light-light", rate, B.summarize(recs, s.slo, 5 / rate), 1.0, None, lambda _m: None)
    return doc.to_json()


def test_markdown_and_plot(tmp_path):
    doc = fake_doc()
    json.dumps(doc)  # JSON-able (no NaN)
    md = bench_markdown(doc, "bench")
    assert "| cell | rate req/s | colocated | pd-prefill | pd-auto |" in md
    assert "ppd bench --cells light-light" in md and "## light-light" in md
    path = bench_plot(doc, tmp_path / "b.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_sim_vs_emu_helpers():
    rows = parse_rows("1p1d:chat:4,2p2d:rag:6")
    assert [(r.stack, r.workload, r.rate) for r in rows] == [("1p1d", "chat", 4.0), ("2p2d", "rag", 6.0)]
    with pytest.raises(ValueError):
        parse_rows("3p3d:chat:4")
    with pytest.raises(KeyError):
        parse_rows("1p1d:nope:4")
    assert pct(1.1, 1.0) == pytest.approx(0.1) and math.isnan(pct(1.0, 0.0))
    base = {"errors": 0, "tpot_p99_ms": 6.0, "ttft_p99_ms": 200.0, "tpot_p50_ms": 5.0, "route_share": {"prefill": 1.0}}
    emu = {**base, "requests": 10, "goodput_rps": 2.0, "slo_attainment": 1.0, "ttft_p50_ms": 100.0}
    sim = {**base, "requests": 10, "goodput_rps": 1.8, "slo_attainment": 0.9, "ttft_p50_ms": 120.0}
    detail = {"ratio": "1:1", "bottleneck": "none", "busy_frac": {}, "ttft_breakdown_ms": {}}
    c = compare(rows[0], emu, sim, detail)
    assert c["diff"]["goodput_rps"] == pytest.approx(-0.1) and c["diff"]["ttft_p50_ms"] == pytest.approx(0.2)
    assert not c["within_target"]  # 20 % off on TTFT
