"""Backend faults mid-run on the real stack (router process + emulated servers on loopback; servers killed with
SIGKILL while requests are in flight).

- Prefill server killed: every request ends with an answer or an explicit error (no hang: each has a client deadline
  far below the decode server's 300 s KV waiting timeout); `auto` keeps serving by the D-route, and so does a forced
  P-route (the policy falls back); the P-route requests in flight at the kill have their decode halves aborted (the
  decode server's running, queued and transfer-waiting counts return to 0) and are retried by the D-route (reason
  prefill-failed-retry); readiness shows the dead server and stays 200 (the D-route serves).
- One of two decode servers killed: its streams end with an explicit error event, its conversations move to the other
  decode server with L = 0 (their cache died with the server) and are answered; with the last decode server gone the
  router answers 503 with Retry-After and /ready is 503.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import time
import uuid

import httpx
import pytest

from experiments.load import Outcome, StreamSeen, classify, openai_error_shape, router_chat
from launch.supervisor import Stack
from ppd.sglang.client import parse_metrics
from ppd.tokenizer import ChatTokenizer

pytestmark = pytest.mark.slow

MODEL = "llama-3-8b"
DEADLINE_S = 20.0  # a request still open after this is LOST (the decode server's own KV timeout is 300 s)
FAST = [
    "router.health_interval_s=0.25",
    "router.metrics_poll_interval_s=0.25",
    "emulator.waiting_timeout_s=300",
]
TWO_DECODE = "decode=[{host: 127.0.0.1, port: 30200, gpu: h200}, {host: 127.0.0.1, port: 30201, gpu: h200}]"


def kill(stack: Stack, name: str) -> None:
    child = next(c for c in stack.supervisor.children if c.spec.name == name)
    os.killpg(child.pgid, signal.SIGKILL)
    child.proc.wait(timeout=5)


def backend_counts(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=5).text
    m = parse_metrics(text)
    transfer = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(("sglang:num_decode_transfer_queue_reqs{", "sglang:num_decode_prealloc_queue_reqs{"))
    )
    return {"running": m.running_reqs, "queued": m.queued_reqs, "waiting_kv": transfer}


def wait_backend_idle(url: str, within_s: float) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < within_s:
        counts = backend_counts(url)
        if not any(counts.values()):
            return
        time.sleep(0.1)
    raise AssertionError(f"{url} still holds requests {within_s} s later: {counts}")


def words(n: int, tag: str) -> str:
    return f"[{tag}] " + " ".join(f"w{(i * 7919) % 1000}" for i in range(n))


def assert_explicit(seen: StreamSeen, what: str) -> Outcome:
    outcome, detail = classify(seen)
    assert outcome is not Outcome.LOST, f"{what}: LOST ({detail})"
    if outcome in (Outcome.ERROR, Outcome.REJECTED) and seen.status != 200:
        assert openai_error_shape(seen.error_body), f"{what}: error body {seen.error_body}"
    return outcome


async def test_prefill_killed_mid_run(embedded_stack):
    stack = await asyncio.to_thread(embedded_stack, extra_overrides=FAST, fresh=True)
    try:
        await _prefill_killed(stack)
    finally:
        await asyncio.to_thread(stack.stop)


async def _prefill_killed(stack: Stack) -> None:
    base, decode_url = stack.router_url, stack.decode_urls[0]
    results: list[tuple[str, float, StreamSeen]] = []  # (policy, sent at (s from start), what the client saw)
    killed_at_s: list[float] = []  # when the kill began (s from start), once it has
    caught: dict[str, StreamSeen] = {}

    def p_route_served() -> int:
        return sum(
            p == "prefill" and classify(seen)[0] is Outcome.OK and seen.route == "prefill" for p, _, seen in results
        )

    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5)) as client:
        # a conversation whose first turn took the P-route: its prompt and answer are cached on the decode server
        conv = [{"role": "user", "content": words(1000, "conversation")}]
        seen, first = await _chat(client, base, "kept", conv, 16, policy="prefill")
        assert assert_explicit(seen, "turn 1") is Outcome.OK and first["ppd"]["route"] == "prefill"
        conv += [first["choices"][0]["message"], {"role": "user", "content": "go on"}]
        t0 = time.perf_counter()

        async def one(i: int, policy: str) -> None:
            sent = time.perf_counter() - t0
            # 4096-token prompts: ~0.1 s of prefill each, so P-route requests are mid-prefill when the server dies
            messages = [{"role": "user", "content": words(2000, f"{uuid.uuid4().hex[:6]}")}]
            headers = {"x-ppd-policy": policy, "x-ppd-conversation": f"pk-{i}"}
            seen = await router_chat(client, base, MODEL, messages, 24, headers, DEADLINE_S)
            results.append((policy, sent, seen))

        async def killer() -> None:
            # the kill follows progress, not the clock (a CPU-starved client sends late): once the P-route has
            # served three requests. A P-route request with a ~16k-token prompt (~0.7 s of prefill) is then surely in
            # flight at the kill: its decode half has registered with the prefill's bootstrap server and waits for KV
            # that will never come
            while p_route_served() < 3:
                assert time.perf_counter() - t0 < DEADLINE_S, f"the P-route served {p_route_served()} before the kill"
                await asyncio.sleep(0.05)
            messages = [{"role": "user", "content": words(8000, "caught")}]
            headers = {"x-ppd-policy": "prefill"}
            job = asyncio.create_task(router_chat(client, base, MODEL, messages, 24, headers, DEADLINE_S))
            await asyncio.sleep(0.3)
            killed_at_s.append(time.perf_counter() - t0)
            await asyncio.to_thread(kill, stack, "prefill-0")
            caught["seen"] = await job

        tasks = [asyncio.create_task(killer())]
        i = 0
        # one request every 0.1 s, two in three forced onto the P-route, until 2.5 s after the kill
        while not killed_at_s or time.perf_counter() - t0 < killed_at_s[0] + 2.5:
            assert i < 400, "the kill never came"
            tasks.append(asyncio.create_task(one(i, "prefill" if i % 3 else "auto")))
            i += 1
            await asyncio.sleep(0.1)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
        # the conversation's next turn (an append) is served by the D-route on top of its cached history
        seen, second = await _chat(client, base, "kept", conv, 16, policy="auto")
        assert assert_explicit(seen, "turn 2 after the kill") is Outcome.OK
        assert second["ppd"]["route"] == "decode"
        assert second["ppd"]["decode_cached_tokens"] >= first["usage"]["prompt_tokens"]

    kill_at_s = killed_at_s[0]
    outcomes = collections.Counter()
    for policy, sent, seen in results:
        outcome = assert_explicit(seen, f"{policy} request sent at {sent:.2f} s")
        outcomes[(policy, "before" if sent < kill_at_s else "after", outcome.value)] += 1
        if outcome is Outcome.ERROR:  # in flight at the kill: told what happened, and that the decode half is gone
            assert seen.status in (502, 503) and seen.error_body["error"]["code"] == "prefill_failed", seen
            assert "decode half was aborted" in seen.error_body["error"]["message"]
        if sent > kill_at_s + 1.0:  # the router has seen the prefill server die: everything goes by the D-route,
            # `prefill` included (the policy falls back when its route cannot run; reason prefill-unhealthy)
            assert outcome is Outcome.OK and seen.route == "decode", (policy, sent, classify(seen))
    print(f"prefill killed at {kill_at_s:.2f} s: {dict(outcomes)}; all {len(results)} ended within {elapsed:.1f} s")
    assert elapsed < kill_at_s + 2.5 + DEADLINE_S
    assert sum(sent > kill_at_s + 1.0 for _, sent, _ in results) >= 5  # enough requests after the kill to judge
    # the request caught mid-prefill: its decode half aborted, it is retried by the D-route at once and answered
    victim = caught["seen"]
    outcome = assert_explicit(victim, "the P-route request in flight at the kill")
    assert outcome is Outcome.OK and victim.route == "decode", classify(victim)
    assert victim.first_token_s - victim.sent_s < 5.0, "it waited for a timeout"
    # the decode halves of the P-route requests in flight at the kill were aborted: nothing waits for its KV
    wait_backend_idle(decode_url, 3.0)
    ready = httpx.get(base + "/ready", timeout=5)
    assert ready.status_code == 200  # the D-route serves: a dead prefill server is no outage
    assert ready.json()["backends"] == {"prefill0": "unhealthy", "decode0": "healthy"}
    metrics = httpx.get(base + "/metrics", timeout=5).text
    assert 'ppd_backend_healthy{backend="prefill0"} 0.0' in metrics
    assert 'reason="prefill-unhealthy"' in metrics and 'reason="prefill-failed-retry"' in metrics

    def total(prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(prefix))

    retried = total('ppd_retries_total{reason="prefill_failed"}')
    errors = sum(1 for _, _, s in results if classify(s)[0] is Outcome.ERROR)
    print(f"retried by the D-route after the prefill half failed: {retried:.0f}; errors: {errors}")
    assert retried >= 1
    assert total('ppd_backend_aborts_total{backend="decode0"}') >= retried + errors


async def test_decode_killed_mid_run_reroutes_conversations(embedded_stack):
    stack = await asyncio.to_thread(embedded_stack, extra_overrides=[*FAST, TWO_DECODE], fresh=True)
    try:
        await _decode_killed(stack)
    finally:
        await asyncio.to_thread(stack.stop)


async def _chat(client, base, conv: str, messages, max_tokens: int, policy: str = "decode") -> tuple[StreamSeen, dict]:
    """A non-stream chat (to read the `ppd` object) with a client deadline; returns what was seen and the body."""
    seen = StreamSeen(sent_s=time.perf_counter())
    body: dict = {}
    try:
        resp = await asyncio.wait_for(
            client.post(
                base + "/v1/chat/completions",
                json={"model": MODEL, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True},
                headers={"x-ppd-conversation": conv, "x-ppd-policy": policy},
            ),
            DEADLINE_S,
        )
        seen.status, body = resp.status_code, resp.json()
        seen.end_s = time.perf_counter()
        if resp.status_code == 200:
            seen.done = seen.finished = body["choices"][0]["finish_reason"] is not None
            seen.first_token_s = seen.end_s
        else:
            seen.error_body = body
    except TimeoutError:
        seen.timed_out = True
    return seen, body


async def _decode_killed(stack: Stack) -> None:
    base = stack.router_url
    tok = ChatTokenizer.load()
    header_tokens = len(tok.encode_chat([{"role": "user", "content": ""}]))
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5)) as client:
        # turn 1 of 8 conversations, concurrently, so the least-loaded choice spreads them over both servers
        convs = {
            f"conv-{i}-{uuid.uuid4().hex[:6]}": [{"role": "user", "content": words(300, str(i))}] for i in range(8)
        }
        firsts = await asyncio.gather(*(_chat(client, base, c, m, 8) for c, m in convs.items()))
        home: dict[str, str] = {}
        for (conv, messages), (seen, body) in zip(convs.items(), firsts, strict=True):
            assert assert_explicit(seen, "turn 1") is Outcome.OK
            home[conv] = body["ppd"]["decode_server"]
            messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
            messages.append({"role": "user", "content": "and then?"})
        by_server = collections.Counter(home.values())
        victim = by_server.most_common(1)[0][0]
        survivor = "decode1" if victim == "decode0" else "decode0"
        on_victim = [c for c, s in home.items() if s == victim]

        # turn 2 streams long answers; the victim dies while they stream
        async def stream_turn(conv: str) -> StreamSeen:
            headers = {"x-ppd-conversation": conv, "x-ppd-policy": "decode"}
            return await router_chat(client, base, MODEL, convs[conv], 400, headers, DEADLINE_S)

        tasks = {c: asyncio.create_task(stream_turn(c)) for c in convs}
        # until the victim generates every stream it holds (a request it has not answered yet when it dies is
        # retried on the survivor, rightly: that is the connect-failure test's case, not this one)
        victim_url = stack.decode_urls[int(victim[-1])]
        t0 = time.perf_counter()
        while (await asyncio.to_thread(backend_counts, victim_url))["running"] < len(on_victim):
            assert time.perf_counter() - t0 < 10, "the victim's streams did not start"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(kill, stack, f"decode-{victim[-1]}")
        seconds = {}
        for conv, task in tasks.items():
            seen = await task
            outcome = assert_explicit(seen, f"turn 2 of {conv} on {home[conv]}")
            seconds[conv] = seen.end_s - seen.sent_s
            if home[conv] == victim:
                assert outcome is Outcome.ERROR and seen.error_event is not None  # told, mid-stream
            else:
                assert outcome is Outcome.OK  # the other server's streams are untouched

        # turn 3: the victim's conversations are answered by the survivor, from scratch (L = 0 but the template)
        for conv in on_victim:
            seen, body = await _chat(client, base, conv, convs[conv], 8)
            assert assert_explicit(seen, f"turn 3 of {conv}") is Outcome.OK
            assert body["ppd"]["decode_server"] == survivor
            assert body["ppd"]["decode_cached_tokens"] <= header_tokens  # its KV died with the server
        ready = (await client.get(base + "/ready")).json()
        assert ready["ready"] is True and ready["backends"][victim] == "unhealthy"

        # the last decode server dies too: 503 with Retry-After, at once, and not ready
        await asyncio.to_thread(kill, stack, f"decode-{survivor[-1]}")
        seen, body = await _chat(client, base, on_victim[0], convs[on_victim[0]], 8)
        assert seen.status == 503 and body["error"]["code"] in ("no_healthy_backend", "backend_error"), body
        assert seen.end_s - seen.sent_s < 5.0
        deadline = time.perf_counter() + 3
        while (ready := await client.get(base + "/ready")).status_code != 503 and time.perf_counter() < deadline:
            await asyncio.sleep(0.1)
        assert ready.status_code == 503 and ready.json()["ready"] is False
        resp = await client.post(
            base + "/v1/completions", json={"model": MODEL, "prompt": "anyone?", "max_tokens": 2}, timeout=5
        )
        assert resp.status_code == 503 and int(resp.headers["retry-after"]) >= 1
    print(f"decode killed: {victim} held {len(on_victim)}/{len(convs)} conversations; turn-2 ends {seconds}")


async def test_hung_decode_server_times_out_and_recovers(embedded_stack):
    """A decode server that hangs (SIGSTOP: it accepts connections and never answers) is the worst case for a
    router: nothing fails, nothing arrives. Streams in progress end with an inter-token timeout error, new requests
    with a first-token timeout or, once the health check has failed, a 503; after SIGCONT it serves again, and the
    aborts the router sent meanwhile free the server."""
    overrides = [
        *FAST,
        "router.first_token_timeout_s=2",
        "router.inter_token_timeout_s=1",
        "router.connect_timeout_s=0.5",
    ]
    stack = await asyncio.to_thread(embedded_stack, extra_overrides=overrides, fresh=True)
    decode = next(c for c in stack.supervisor.children if c.spec.name == "decode-0")
    base = stack.router_url
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5)) as client:
            messages = [{"role": "user", "content": words(200, "hang")}]
            streaming = asyncio.create_task(
                router_chat(client, base, MODEL, messages, 2000, {"x-ppd-policy": "decode"}, DEADLINE_S)
            )
            await asyncio.sleep(0.8)  # well into the stream
            os.killpg(decode.pgid, signal.SIGSTOP)
            t_stop = time.perf_counter()
            late = asyncio.create_task(
                router_chat(client, base, MODEL, [{"role": "user", "content": "anyone?"}], 8, {}, DEADLINE_S)
            )
            seen = await streaming
            assert assert_explicit(seen, "stream through the hang") is Outcome.ERROR
            assert "inter_token_timeout" in seen.error_event and seen.end_s - t_stop < 5.0
            seen = await late
            assert assert_explicit(seen, "request sent into the hang") in (Outcome.ERROR, Outcome.REJECTED)
            assert seen.status in (503, 504) and seen.end_s - seen.sent_s < 6.0, (seen.status, seen.error_body)
            for _ in range(50):  # the health check times out: not ready
                ready = await client.get(base + "/ready")
                if ready.status_code == 503:
                    break
                await asyncio.sleep(0.1)
            assert ready.status_code == 503 and ready.json()["backends"]["decode0"] == "unhealthy"
            os.killpg(decode.pgid, signal.SIGCONT)
            for _ in range(100):
                if (await client.get(base + "/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            seen = await router_chat(client, base, MODEL, [{"role": "user", "content": "back?"}], 8, {}, DEADLINE_S)
            assert classify(seen)[0] is Outcome.OK
        # the abort the router sent for the timed-out stream reached the server once it woke: nothing runs on
        await asyncio.to_thread(wait_backend_idle, stack.decode_urls[0], 3.0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(decode.pgid, signal.SIGCONT)
        await asyncio.to_thread(stack.stop)
