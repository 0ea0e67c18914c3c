"""`ppd simulate` against hand-computed timelines: deterministic arrivals and service on one or two servers.

Each expected value is written out from the scheduling rules (prefill first; a decode step streams weights + every
running request's KV; a P-route request lands on the decode server after prefill + KV move) with the roofline's
per-forward times, and the simulator must agree to float precision.
"""

from __future__ import annotations

import pytest

from ppd import roofline, specs
from ppd.simulate.cluster import ClusterSpec, simulate
from ppd.simulate.trace import TraceRequest

M = specs.model("llama-3-8b")
G = specs.gpu("h200")
EFF = roofline.DEFAULT_EFFICIENCY


def oh(prompt: int) -> float:
    return roofline.request_overhead_s(prompt, EFF)


def ext(*items: tuple[int, int]) -> float:
    return roofline.extend_batch_breakdown(M, G, list(items), EFF).total_s


def step(batch: int, kv: int) -> float:
    return roofline.decode_step_time_s(M, G, batch, kv, EFF)


def req(t: float, prompt: int, output: int, conv: str) -> TraceRequest:
    return TraceRequest(arrival_s=t, prompt_tokens=prompt, output_tokens=output, conversation_id=conv)


def by_conv(result):
    return {r.trace.conversation_id: r for r in result.requests}


def test_one_server_spaced_arrivals_exact():
    """Fixed requests every 10 s on one colocated server: no queueing, TTFT = overhead + prefill, TPOT = mean step."""
    prompt, output = 1000, 100
    trace = [req(10.0 * i, prompt, output, f"c{i}") for i in range(3)]
    res = simulate(trace, ClusterSpec(colocated=1))
    ttft = oh(prompt) + ext((prompt, 0))
    decode = sum(step(1, prompt + j) for j in range(1, output))  # step j: context = prompt + j tokens
    for i, r in enumerate(sorted(res.requests, key=lambda r: r.issue_s)):
        assert r.issue_s == 10.0 * i
        assert r.first_token_s - r.issue_s == pytest.approx(ttft, rel=1e-12)
        assert (r.last_token_s - r.first_token_s) / (output - 1) == pytest.approx(decode / (output - 1), rel=1e-9)
        assert r.cached_tokens == 0
    assert res.end_s == pytest.approx(20.0 + ttft + decode, rel=1e-12)


def test_simultaneous_arrivals_share_one_forward_and_batch():
    """Two equal requests at t=0: one extend forward for both, then decode steps with batch 2."""
    prompt, output = 1000, 3
    res = simulate([req(0.0, prompt, output, "a"), req(0.0, prompt, output, "b")], ClusterSpec(colocated=1))
    first = oh(prompt) + ext((prompt, 0), (prompt, 0))
    last = first + step(2, 2 * (prompt + 1)) + step(2, 2 * (prompt + 2))
    for r in res.requests:
        assert r.first_token_s == pytest.approx(first, rel=1e-12)
        assert r.last_token_s == pytest.approx(last, rel=1e-12)


def test_chunked_prefill_exact():
    prompt = 10_000
    res = simulate([req(0.0, prompt, 1, "a")], ClusterSpec(colocated=1, chunk_size=4096))
    expected = oh(prompt) + ext((4096, 0)) + ext((4096, 4096)) + ext((1808, 8192))
    (r,) = res.requests
    assert r.first_token_s == pytest.approx(expected, rel=1e-12)
    assert r.last_token_s == r.first_token_s  # one token: done with the prefill


def test_prefill_interrupts_decoding_exact():
    """A long prompt arriving mid-decode waits for the step under way, stalls the decode batch for its whole prefill,
    then decodes in the same batch (prefill-first scheduling, as the emulator and SGLang's non-mixed scheduler)."""
    p1, o1, p2, o2, t2 = 500, 200, 8000, 2, 0.5
    res = by_conv(simulate([req(0.0, p1, o1, "a"), req(t2, p2, o2, "b")], ClusterSpec(colocated=1)))
    f1 = oh(p1) + ext((p1, 0))
    arrive2 = t2 + oh(p2)
    # r1 decodes alone until the step that is running when r2 reaches the server has ended
    t, j = f1, 0
    while t < arrive2:
        j += 1
        t += step(1, p1 + j)
    f2 = t + ext((p2, 0))
    # one step with both (r1 has 1 + j tokens, r2 has 1), r2 is done; r1 continues alone
    t = f2 + step(2, (p1 + 1 + j) + (p2 + 1))
    last2 = t
    done1 = 1 + j + 1
    for k in range(done1, o1):
        t += step(1, p1 + k)
    assert 0 < j < o1 - 2
    assert res["a"].first_token_s == pytest.approx(f1, rel=1e-12)
    assert res["b"].first_token_s == pytest.approx(f2, rel=1e-12)
    assert res["b"].last_token_s == pytest.approx(last2, rel=1e-12)
    assert res["a"].last_token_s == pytest.approx(t, rel=1e-9)


def test_pd_pair_exact():
    """1P1D, P-route: TTFT = overhead + prefill + KV move; the decode GPU stalls for the KV landing, then decodes."""
    prompt, output = 2000, 10
    link = specs.link("nvlink")
    res = simulate([req(0.0, prompt, output, "a")], ClusterSpec(prefill=1, decode=1, policy="prefill"))
    (r,) = res.requests
    move = roofline.transfer_time_s(link, roofline.kv_bytes(M, prompt))
    first = oh(prompt) + ext((prompt, 0)) + move
    decode = roofline.kv_landing_time_s(M, G, prompt, EFF) + sum(step(1, prompt + j) for j in range(1, output))
    assert r.route == "prefill"
    assert r.kv_bytes == prompt * M.kv_bytes_per_token
    assert r.first_token_s == pytest.approx(first, rel=1e-12)
    assert r.last_token_s == pytest.approx(first + decode, rel=1e-9)
    assert res.ports["prefill-0"]["bytes"] == r.kv_bytes


def test_link_is_shared_transfers_queue():
    """Two equal prompts prefilled together on one P: their KV moves go one after the other over the P's port."""
    prompt = 4000
    link = specs.link("tcp-25g")
    trace = [req(0.0, prompt, 1, "a"), req(0.0, prompt, 1, "b")]
    res = simulate(trace, ClusterSpec(prefill=1, decode=1, link="tcp-25g"))
    move = roofline.transfer_time_s(link, roofline.kv_bytes(M, prompt))
    ready = oh(prompt) + ext((prompt, 0), (prompt, 0))
    firsts = sorted(r.first_token_s for r in res.requests)
    assert firsts[0] == pytest.approx(ready + move, rel=1e-12)
    assert firsts[1] == pytest.approx(ready + 2 * move, rel=1e-12)
    # without contention (the emulator's model) both moves take their own link time at once
    free = simulate(trace, ClusterSpec(prefill=1, decode=1, link="tcp-25g", link_sharing="none"))
    assert [r.first_token_s for r in free.requests] == pytest.approx([ready + move] * 2, rel=1e-12)


def test_multi_turn_reuses_decode_cache_on_d_route():
    """Turn 2 on the D-route prefills only its new message on top of turn 1's prompt + answer."""
    p1, o1, new = 3000, 50, 200
    p2 = p1 + o1 + new
    trace = [
        TraceRequest(0.0, p1, o1, "c", turn=0),
        TraceRequest(0.0, p2, 10, "c", turn=1, think_s=1.0),
    ]
    res = simulate(trace, ClusterSpec(prefill=1, decode=1, policy="decode"))
    r1, r2 = sorted(res.requests, key=lambda r: r.trace.turn)
    assert r2.issue_s == pytest.approx(r1.last_token_s + 1.0)
    assert (r2.route, r2.cached_tokens, r2.decode_cached_tokens) == ("decode", p1 + o1, p1 + o1)
    assert r2.first_token_s - r2.issue_s == pytest.approx(oh(p2) + ext((new, p1 + o1)), rel=1e-12)
    # the prefill server never saw this conversation: the P-route would have recomputed everything
    assert r2.prefill_cached_tokens == 0


@pytest.mark.parametrize("gpu, batch, kv0, k", [("h200", 8, 20_000, 300), ("h20", 256, 50_000, 4000)])
def test_decode_bursts_equal_step_by_step(gpu, batch, kv0, k):
    """A burst's closed form (or its explicit sum where the step switches from FLOP- to memory-bound) equals adding
    up every step; an interruption at any time stops at the end of the step under way."""
    from ppd.simulate.server import _StepPlan

    g = specs.gpu(gpu)
    plan = _StepPlan(M, g, EFF, batch, kv0, k)
    t, ends = 0.0, [0.0]
    for i in range(k):
        t += roofline.decode_step_time_s(M, g, batch, kv0 + i * batch, EFF)
        ends.append(t)
    for n in (0, 1, k // 3, k - 1, k):
        assert plan.end(n) == pytest.approx(ends[n], rel=1e-9)
    for n in (1, k // 2, k):
        assert plan.steps_to_finish(ends[n] - 1e-9) == n  # just before step n ends: step n completes
        assert plan.steps_to_finish(ends[n - 1] + 1e-9) == n  # just after step n-1 ended: step n is under way
