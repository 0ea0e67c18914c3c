"""A client that goes away stops the backend work, seen from the backends' own metrics (real router process, emulated
servers on loopback): running requests drop to 0 at once, and the emulated GPU stops stepping (its decode iteration
count and sglang:generation_tokens_total stay flat), long before the asked-for output length would have been reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import httpx
import pytest

from experiments.load import PromptMaker
from ppd.sglang.client import parse_metrics

pytestmark = pytest.mark.slow

MODEL = "llama-3-8b"
PREFILL_PROMPT_TOKENS = 30000  # ~2 s of emulated prefill (model.context_length is 32768)
LONG = 4000  # output tokens asked: ~25 s of decoding at time_scale 1, if nobody stopped it


@pytest.fixture(scope="module")
def stack(embedded_stack):
    return embedded_stack()


class Backend:
    """A backend's counters that show whether its (emulated) GPU is still working."""

    def __init__(self, url: str):
        self.url = url

    def sample(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        m = parse_metrics(text)

        def total(name: str) -> float:  # a labelled series appears with its first sample: absent = 0
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

        gen, transfer = total("sglang:generation_tokens_total"), total("sglang:num_decode_transfer_queue_reqs")
        prompt = total("sglang:prompt_tokens_total")
        iterations = httpx.get(self.url + "/server_info", timeout=5).json()["ppd_emulator"]["iterations"]
        return {
            "running": m.running_reqs,
            "queued": m.queued_reqs,
            "transfer": transfer,
            "generation_tokens": gen,
            "prompt_tokens": prompt,
            "steps": float(sum(iterations.values())),
        }

    def idle(self) -> bool:
        s = self.sample()
        return s["running"] == 0 and s["queued"] == 0 and s["transfer"] == 0

    def wait_idle(self, within_s: float) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < within_s:
            if self.idle():
                return time.perf_counter() - t0
            time.sleep(0.05)
        raise AssertionError(f"{self.url} still busy {within_s} s after the client left: {self.sample()}")

    def assert_stopped(self, quiet_s: float = 0.6) -> None:
        """No GPU iteration and no generated token over `quiet_s`."""
        a = self.sample()
        time.sleep(quiet_s)
        b = self.sample()
        assert (b["steps"], b["generation_tokens"]) == (a["steps"], a["generation_tokens"]), (a, b)


def _body(content: str, stream: bool = True) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"[{uuid.uuid4().hex[:8]}] {content}"}],
        "max_tokens": LONG,
        "ignore_eos": True,
        "stream": stream,
    }


@pytest.mark.parametrize("policy", ["decode", "prefill"])
def test_disconnect_mid_stream_stops_the_decode_server(stack, policy):
    decode = Backend(stack.decode_urls[0])
    decode.wait_idle(10)
    before = decode.sample()
    with httpx.Client(timeout=30) as http:
        with http.stream(
            "POST",
            stack.router_url + "/v1/chat/completions",
            json=_body("Write a very long essay."),
            headers={"x-ppd-policy": policy},
        ) as resp:
            assert resp.status_code == 200 and resp.headers["x-ppd-route"] == policy
            lines = resp.iter_lines()
            chunks = 0
            while chunks < 20:  # 20 content chunks: well into the stream
                if next(lines).startswith("data:"):
                    chunks += 1
            busy = decode.sample()
            assert busy["running"] == 1 and busy["steps"] > before["steps"]  # it is generating right now
    took_s = decode.wait_idle(3.0)
    decode.assert_stopped()
    after = decode.sample()
    steps = after["steps"] - before["steps"]
    assert steps < LONG / 4, f"{steps} GPU iterations: the request ran on after the client left"
    print(f"{policy}: decode server idle {took_s * 1e3:.0f} ms after the disconnect, {steps:.0f} iterations run")
    metrics = httpx.get(stack.router_url + "/metrics").text
    assert 'outcome="client_disconnect"' in metrics and f'route="{policy}"' in metrics


async def test_disconnect_before_the_first_token_aborts_both_halves(stack):
    """P-route with a long prompt: the client leaves while the prefill server is still computing (a 30k-token
    prefill: ~2 s of emulated H200). The prefill half and the decode half (waiting for its KV) are both dropped at
    once: the prefill never completes (its prompt_tokens_total stays flat) and no token is generated."""
    prefill, decode = Backend(stack.prefill_urls[0]), Backend(stack.decode_urls[0])
    await asyncio.to_thread(decode.wait_idle, 10)
    await asyncio.to_thread(prefill.wait_idle, 10)
    before_p, before_d = prefill.sample(), decode.sample()
    messages = PromptMaker(PREFILL_PROMPT_TOKENS, seed=7).messages()
    body = {"model": MODEL, "messages": messages, "max_tokens": 64, "ignore_eos": True, "stream": True}

    async def request() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            headers = {"x-ppd-policy": "prefill"}
            async with http.stream(
                "POST", stack.router_url + "/v1/chat/completions", json=body, headers=headers
            ) as resp:  # the stream starts (status, headers) once both servers accepted the request
                assert resp.status_code == 200 and resp.headers["x-ppd-route"] == "prefill"
                async for line in resp.aiter_lines():
                    if line.startswith("data:"):
                        raise AssertionError("a token came before the client left")

    task = asyncio.create_task(request())
    t0 = time.perf_counter()
    while True:  # until the prefill server is computing this prompt
        busy = await asyncio.to_thread(prefill.sample)
        if busy["running"] + busy["queued"] >= 1:
            break
        assert time.perf_counter() - t0 < 5 and not task.done(), busy
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    task.cancel()  # the client goes away: its connection closes, before any token of the answer
    with contextlib.suppress(asyncio.CancelledError):
        await task
    t_left = time.perf_counter()
    idle_p = await asyncio.to_thread(prefill.wait_idle, 2.0)
    idle_d = await asyncio.to_thread(decode.wait_idle, 2.0)
    await asyncio.to_thread(prefill.assert_stopped)
    await asyncio.to_thread(decode.assert_stopped)
    after_p, after_d = prefill.sample(), decode.sample()
    assert after_p["prompt_tokens"] == before_p["prompt_tokens"], "the prefill ran to its end for nobody"
    assert after_d["generation_tokens"] == before_d["generation_tokens"]
    print(
        f"before the first token: prefill idle {idle_p * 1e3:.0f} ms, decode idle {idle_d * 1e3:.0f} ms after the "
        f"client left ({(t_left - t0):.2f} s into a ~2 s prefill)"
    )


def test_disconnect_of_a_non_stream_request_stops_the_backend(stack):
    """No stream: the client times out and closes its connection; the router must not keep the generation going."""
    decode = Backend(stack.decode_urls[0])
    decode.wait_idle(10)
    before = decode.sample()
    with httpx.Client(timeout=httpx.Timeout(30, read=1.0)) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post(
                stack.router_url + "/v1/chat/completions",
                json=_body("A long answer, not streamed.", stream=False),
                headers={"x-ppd-policy": "decode"},
            )
    decode.wait_idle(3.0)
    decode.assert_stopped()
    assert decode.sample()["steps"] - before["steps"] < LONG / 4
