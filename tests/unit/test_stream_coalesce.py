"""Coalescing under load: backend SSE events that arrive in one network read leave the router as one OpenAI chunk
carrying all their text; the first token is passed on at once, never held for more."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from httpx_transport import HttpxTransport
from router_fakes import D_URL, expected_tokens, make_config, running_router

from ppd.sglang.client import SGLangClient
from ppd.tokenizer import ChatTokenizer

PROMPT = [100 + i for i in range(40)]


class GroupingTransport(httpx.AsyncBaseTransport):
    """The fake cluster, but a decode server's /generate events are delivered in the reads `plan` describes: a list
    of event counts; `hold` (an Event) is awaited before the second read."""

    def __init__(self, inner: httpx.AsyncBaseTransport, plan: list[int], hold: asyncio.Event | None = None):
        self.inner, self.plan, self.hold = inner, plan, hold

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        resp = await self.inner.handle_async_request(request)
        if request.url.path != "/generate" or not str(request.url).startswith(D_URL):
            return resp
        plan, hold = list(self.plan), self.hold

        async def regrouped():
            events: list[bytes] = []
            async for data in resp.aiter_raw():
                events += [e + b"\n\n" for e in data.split(b"\n\n") if e.strip()]
            for k, n in enumerate([*plan, len(events)]):
                if k == 1 and hold is not None:
                    await hold.wait()
                if events:
                    yield b"".join(events[:n])
                    del events[:n]

        return httpx.Response(resp.status_code, headers=resp.headers, content=regrouped())


def text_chunks(body: str) -> list[dict]:
    out = []
    for line in body.splitlines():
        if line.startswith("data:") and line.strip() != "data: [DONE]":
            out.append(json.loads(line[5:]))
    return out


def completion_body(n: int, **extra) -> dict:
    return {"model": "llama-3-8b", "prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": True, **extra}


async def test_events_of_one_read_leave_as_one_chunk():
    n = 12
    cfg, cluster = make_config("decode")
    cluster.transport = GroupingTransport(cluster.transport, plan=[1, 5, 3])  # then the remaining 3 (+ the finish)
    options = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    async with running_router(cfg, cluster) as (_, client):
        r = await client.post("/v1/completions", json=completion_body(n, **options))
        assert r.status_code == 200, r.text
    chunks = text_chunks(r.text)
    texts = [c for c in chunks if c["choices"] and c["choices"][0]["text"]]
    counts = [c["usage"]["completion_tokens"] for c in texts]
    assert counts == [1, 6, 9, 12]  # one chunk per read, each saying how many tokens so far
    tok = ChatTokenizer.load("builtin")
    assert "".join(c["choices"][0]["text"] for c in texts) == tok.decode(expected_tokens(PROMPT, n))
    closing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert closing[0]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == n and chunks[-1]["ppd"]["route"] == "decode"


async def test_first_token_is_not_held_back():
    """The backend sends one event, then nothing until the client has it: a router that waited for more would hang."""
    hold = asyncio.Event()
    cfg, cluster = make_config("decode")
    cluster.transport = GroupingTransport(cluster.transport, plan=[1], hold=hold)
    async with running_router(cfg, cluster) as (_, client):
        async with client.stream("POST", "/v1/completions", json=completion_body(8)) as r:
            assert r.status_code == 200
            got = ""
            lines = r.aiter_lines()
            while True:
                line = await asyncio.wait_for(anext(lines), 5.0)
                if line.startswith("data:") and (json.loads(line[5:])["choices"] or [{}])[0].get("text"):
                    break
            hold.set()
            got = "".join([line async for line in lines])
    assert "[DONE]" in got


async def test_stop_string_inside_a_coalesced_read():
    n = 12
    tok = ChatTokenizer.load("builtin")
    full = tok.decode(expected_tokens(PROMPT, n))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cfg, cluster = make_config("decode")
    cluster.transport = GroupingTransport(cluster.transport, plan=[1, 20])  # everything else in one read
    async with running_router(cfg, cluster) as (_, client):
        r = await client.post("/v1/completions", json=completion_body(n, stop=[stop]))
    texts = [c["choices"][0]["text"] for c in text_chunks(r.text) if c["choices"] and c["choices"][0]["text"]]
    assert "".join(texts) == full[: full.index(stop)]
    assert len(texts) <= 2


@pytest.mark.parametrize("split", [1, 7, 30])
async def test_client_batches_split_reads_at_line_ends(split: int):
    events = [b'data: {"output_ids": [%d], "meta_info": {"completion_tokens": %d}}\n\n' % (i, i + 1) for i in range(5)]
    blob = b"".join(events) + b"data: [DONE]\n\n"

    async def reads():
        for i in range(0, len(blob), split):
            yield blob[i : i + split]

    transport = httpx.MockTransport(lambda req: httpx.Response(200, content=reads()))
    net = HttpxTransport(transport)
    async with SGLangClient(net).generate_batches("http://b", b"{}") as batches:
        got = [[o.output_ids[0] for o in batch] async for batch in batches]
    await net.aclose()
    assert [i for b in got for i in b] == [0, 1, 2, 3, 4]
    if split >= len(blob):
        assert len(got) == 1
