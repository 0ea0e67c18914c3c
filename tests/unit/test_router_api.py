"""The router's OpenAI API against fake backends: responses, streams, usage, headers, errors, side endpoints."""

from __future__ import annotations

import asyncio
import json

import pytest
from router_fakes import D_URL, expected_tokens, make_config, running_router

from ppd.tokenizer import ChatTokenizer

MODEL = "llama-3-8b"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a KV cache?"}]
TOK = ChatTokenizer.load()


def sse_events(text: str) -> list:
    out = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


@pytest.fixture
async def api():
    cfg, cluster = make_config("decode")
    async with running_router(cfg, cluster) as (app, client):
        yield client, cluster


def assert_openai_error(r, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


async def test_chat_non_stream(api):
    client, _ = api
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt = TOK.encode_chat(MESSAGES)
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": TOK.decode(expected_tokens(prompt, 6))}
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": 6,
        "total_tokens": len(prompt) + 6,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    ppd = body["ppd"]
    assert ppd["route"] == "decode" and ppd["policy"] == "decode" and ppd["append_tokens"] == len(prompt)
    for h in (
        "x-ppd-route",
        "x-ppd-policy",
        "x-ppd-reason",
        "x-ppd-cache-rate",
        "x-ppd-decode-cached-tokens",
        "x-ppd-append-tokens",
        "x-request-id",
    ):
        assert h in r.headers
    assert r.headers["x-ppd-append-tokens"] == str(len(prompt))


async def test_chat_stream_matches_non_stream(api):
    client, _ = api
    req = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = await client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == TOK.decode(expected_tokens(TOK.encode_chat(MESSAGES), 8))
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finals] == ["length"]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 8
    assert usage_chunk["ppd"]["route"] == "decode"
    assert all(c["id"] == chunks[0]["id"] and c["object"] == "chat.completion.chunk" for c in chunks)


async def test_stream_without_usage_puts_ppd_on_the_final_chunk(api):
    client, _ = api
    r = await client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "stream": True}
    )
    chunks = sse_events(r.text)[:-1]
    assert "usage" not in chunks[-1] and chunks[-1]["choices"][0]["finish_reason"] == "length"
    ppd = chunks[-1]["ppd"]
    assert ppd["route"] == "decode"
    # the router's own time on the path: both phases measured, each a small part of the request's TTFT
    path = ppd["router_ms"]
    assert 0 < path["dispatch"] < ppd["e2e_ms"] and 0 < path["relay"] < ppd["e2e_ms"]
    metrics = (await client.get("/metrics")).text
    assert 'ppd_router_path_seconds_count{phase="dispatch"} 1.0' in metrics
    assert 'ppd_router_path_seconds_count{phase="relay"} 1.0' in metrics
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2})
    assert r.json()["ppd"]["router_ms"]["relay"] is None  # no stream: nothing relayed token by token


async def test_completions_text_and_token_ids(api):
    client, _ = api
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4})
    assert r.status_code == 200, r.text
    ids = TOK.encode("Once upon a time")
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == TOK.decode(expected_tokens(ids, 4))
    assert body["usage"]["prompt_tokens"] == len(ids)
    r2 = await client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 4})
    assert r2.json()["choices"][0]["text"] == body["choices"][0]["text"]
    r3 = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": ["Once upon a time"], "max_tokens": 4, "stream": True}
    )
    chunks = sse_events(r3.text)[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == body["choices"][0]["text"]
    assert chunks[-1]["object"] == "text_completion"


async def test_default_completion_length_is_16(api):
    client, _ = api
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "a"})
    assert r.json()["usage"]["completion_tokens"] == 16


async def test_eos_finishes_with_stop(api):
    client, cluster = api
    cluster[D_URL].eos_after = 3
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 10})
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 4  # three tokens and the EOS
    prompt = TOK.encode_chat(MESSAGES)
    assert body["choices"][0]["message"]["content"] == TOK.decode(expected_tokens(prompt, 3))


@pytest.mark.parametrize(
    "body, status, code, param",
    [
        ({"model": MODEL}, 400, "missing_required_parameter", "messages"),
        ({"model": MODEL, "messages": []}, 400, None, "messages"),
        ({"model": MODEL, "messages": MESSAGES, "max_tokens": -5}, 400, None, "max_tokens"),
        ({"model": MODEL, "messages": MESSAGES, "max_tokens": 0}, 400, None, "max_tokens"),
        ({"model": "gpt-4o", "messages": MESSAGES}, 404, "model_not_found", "model"),
        ({"model": MODEL, "messages": MESSAGES, "n": 2}, 400, "unsupported", "n"),
        ({"model": MODEL, "messages": MESSAGES, "max_tokens": 4090}, 400, "context_length_exceeded", "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, None, None),
        ({"model": MODEL, "messages": MESSAGES, "temperature": 9}, 400, None, "temperature"),
        ({"messages": MESSAGES}, 400, "missing_required_parameter", "model"),
    ],
)
async def test_bad_chat_requests_get_openai_errors(api, body, status, code, param):
    client, cluster = api
    r = await client.post("/v1/chat/completions", json=body)
    assert_openai_error(r, status, code, param)
    assert cluster.generate_bodies(D_URL) == []  # nothing reached a backend
    ok = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2})
    assert ok.status_code == 200  # the router keeps serving


async def test_context_limit_is_named(api):
    client, _ = api
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": [7] * 4000, "max_tokens": 200})
    err = assert_openai_error(r, 400, "context_length_exceeded", "prompt")
    assert "4096" in err["message"]


async def test_malformed_json_and_bad_prompts(api):
    client, _ = api
    r = await client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(r, 400, "invalid_json")
    # ids outside the vocabulary, named in the message: too large, negative, beyond int64
    for prompt, bad in (([1, 2, 200000], 200000), ([5, -1, 7], -1), ([3, 2**63], 2**63)):
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
        err = assert_openai_error(r, 400, "invalid_value", "prompt")
        assert f"token id {bad} is outside the vocabulary" in err["message"]
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"]})
    assert_openai_error(r, 400, "unsupported", "prompt")
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "", "max_tokens": 2})
    assert_openai_error(r, 400, "invalid_value", "prompt")
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "echo": True})
    assert_openai_error(r, 400, "unsupported", "echo")
    r = await client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES}, headers={"x-ppd-policy": "nonsense"}
    )
    assert_openai_error(r, 400, "unknown_policy", "x-ppd-policy")
    r = await client.get("/v1/nothing-here")
    assert_openai_error(r, 404)
    r = await client.get("/v1/completions")  # the generation endpoints take POST only
    assert_openai_error(r, 405)
    assert r.headers["allow"] == "POST"
    r = await client.post("/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert_openai_error(r, 400, "invalid_value")  # JSON, but not an object
    r = await client.post("/v1/chat/completions", content=b"")
    assert_openai_error(r, 400, "invalid_json")
    metrics = (await client.get("/metrics")).text
    assert 'ppd_requests_total{endpoint="completions",outcome="bad_request",route="none"}' in metrics


async def test_side_endpoints(api):
    client, _ = api
    models = (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = await client.get("/ready")
    assert ready.status_code == 200 and ready.json()["backends"] == {"prefill0": "healthy", "decode0": "healthy"}
    await client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2})
    metrics = (await client.get("/metrics")).text
    for family in (
        "ppd_requests_total",
        "ppd_ttft_seconds_bucket",
        "ppd_tpot_seconds",
        "ppd_e2e_seconds",
        "ppd_routing_decisions_total",
        "ppd_inflight",
        "ppd_backend_queue",
        "ppd_kv_bytes_total",
    ):
        assert family in metrics, family
    assert 'ppd_requests_total{endpoint="chat",outcome="ok",route="decode"} 1.0' in metrics
    assert 'ppd_routing_decisions_total{policy="decode",reason="fixed",route="decode"} 1.0' in metrics
    assert (await client.get("/ppd/model")).json()["policy"] == "decode"
    backends = (await client.get("/ppd/backends")).json()["backends"]
    assert {b["name"]: b["capacity_source"] for b in backends} == {"prefill0": "server_info", "decode0": "server_info"}


async def test_ready_is_503_until_backends_are_healthy():
    cfg, cluster = make_config("decode")
    cluster[D_URL].connect_error = True
    async with running_router(cfg, cluster, ready=False) as (_, client):
        for _ in range(200):  # until the first health check has failed it
            r = await client.get("/ready")
            if r.json()["backends"]["decode0"] == "unhealthy":
                break
            await asyncio.sleep(0.01)
        assert r.status_code == 503 and r.json()["backends"]["decode0"] == "unhealthy"
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES})
        assert_openai_error(r, 503, "no_healthy_backend")
        assert r.headers["retry-after"] == "1"
        assert (await client.get("/health")).status_code == 200  # alive, just not ready


async def test_openapi_schema_is_served(api):
    client, _ = api
    schema = (await client.get("/openapi.json")).json()
    assert "/v1/chat/completions" in schema["paths"] and "/v1/completions" in schema["paths"]
