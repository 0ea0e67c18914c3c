"""End to end: the official `openai` client against the embedded stack (emulated prefill + decode servers moving KV
over Mooncake TCP, and the router), all real processes on loopback."""

from __future__ import annotations

import time
import uuid

import httpx
import openai
import pytest

from ppd.sglang.client import parse_metrics
from ppd.tokenizer import ChatTokenizer

pytestmark = pytest.mark.slow

MODEL = "llama-3-8b"
TOK = ChatTokenizer.load()


@pytest.fixture(scope="module")
def stack(embedded_stack):
    return embedded_stack()


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.router_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def fresh(text: str) -> list[dict]:
    """A prompt no other test has sent (nothing cached for it yet)."""
    return [{"role": "user", "content": f"[{uuid.uuid4().hex[:8]}] {text}"}]


def chat(client, messages, policy: str | None = None, conversation: str | None = None, **kw):
    headers = {k: v for k, v in (("x-ppd-policy", policy), ("x-ppd-conversation", conversation)) if v}
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=kw.pop("max_tokens", 12), temperature=0, extra_headers=headers, **kw
    )
    return raw.headers, raw.parse()


def chat_stream(client, messages, policy: str, **kw) -> list:
    """Every chunk of a streamed chat completion (12 tokens, greedy) by the given policy."""
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        extra_headers={"x-ppd-policy": policy},
        **kw,
    )
    return list(stream)


def test_chat_route_header_and_usage(client):
    for policy in ("prefill", "decode"):
        messages = fresh("Describe the KV cache of a transformer.")
        headers, completion = chat(client, messages, policy)
        assert headers["x-ppd-route"] == policy and headers["x-ppd-policy"] == policy
        assert headers["x-request-id"]
        choice = completion.choices[0]
        assert choice.message.role == "assistant" and choice.message.content
        assert completion.usage.prompt_tokens == len(TOK.encode_chat(messages))
        assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
        if choice.finish_reason == "length":
            assert completion.usage.completion_tokens == 12
        # a fresh prompt: at most the chat template's opening tokens are cached (the P-route's decode server: none)
        cached = completion.usage.prompt_tokens_details.cached_tokens
        assert cached == (0 if policy == "prefill" else int(headers["x-ppd-decode-cached-tokens"]))
        assert cached < completion.usage.prompt_tokens // 2
        assert completion.model_extra["ppd"]["route"] == policy


def test_stream_matches_non_stream(client):
    messages = fresh("Stream me a short story.")
    _, whole = chat(client, messages, "decode")
    chunks = chat_stream(client, messages, "prefill", stream_options={"include_usage": True})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].model_extra["ppd"]["route"] == "prefill"


def test_completions(client):
    prompt = f"{uuid.uuid4().hex[:6]}: the three laws of robotics are"
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    completion = raw.parse()
    assert raw.headers["x-ppd-route"] in ("prefill", "decode")
    assert completion.choices[0].text
    assert completion.usage.prompt_tokens == len(TOK.encode(prompt))
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True)
        if c.choices
    )
    assert streamed == completion.choices[0].text


def test_d_route_and_p_route_give_the_same_tokens(client):
    messages = fresh("Same prompt, two routes: what is disaggregated serving?")
    hp, by_p = chat(client, messages, "prefill", max_tokens=24)
    hd, by_d = chat(client, messages, "decode", max_tokens=24)
    assert (hp["x-ppd-route"], hd["x-ppd-route"]) == ("prefill", "decode")
    assert by_d.choices[0].message.content == by_p.choices[0].message.content
    assert by_d.usage.completion_tokens == by_p.usage.completion_tokens
    # the decode server kept the P-route's KV: the D-route found the prompt cached there
    assert int(hd["x-ppd-decode-cached-tokens"]) == by_d.usage.prompt_tokens - 1


def test_three_turn_conversation_reuses_decode_cache(client):
    conversation = uuid.uuid4().hex
    messages = fresh("Let us talk about radix trees.")
    previous_prompt = previous_completion = 0
    for turn in range(3):
        headers, completion = chat(client, messages, "decode", conversation)
        assert headers["x-ppd-route"] == "decode"
        cached = int(headers["x-ppd-decode-cached-tokens"])
        if turn == 0:
            assert cached < completion.usage.prompt_tokens // 2  # at most the chat template's header is shared
        else:
            # the previous prompt and the previous answer are all on the decode server
            assert cached >= previous_prompt + previous_completion - 1
            # the server's own count: the router's, or one more where it also cached the last output token's KV
            assert completion.usage.prompt_tokens_details.cached_tokens in (cached, cached + 1)
        previous_prompt, previous_completion = completion.usage.prompt_tokens, completion.usage.completion_tokens
        messages = messages + [
            {"role": "assistant", "content": completion.choices[0].message.content},
            {"role": "user", "content": f"Tell me more (turn {turn + 2})."},
        ]


def test_bad_input_keeps_the_router_serving(client, stack):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    assert exc.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=fresh("x"), max_tokens=-1)
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="no-such-model", messages=fresh("x"), max_tokens=4)
    assert exc.value.body["code"] == "model_not_found"
    r = httpx.post(
        stack.router_url + "/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    _, ok = chat(client, fresh("still there?"), "decode", max_tokens=2)
    assert ok.choices[0].message.content is not None


def _decode_metrics(stack):
    return parse_metrics(httpx.get(stack.decode_urls[0] + "/metrics", timeout=5).text)


def test_client_disconnect_aborts_backend_work(stack):
    body = {
        "model": MODEL,
        "messages": fresh("Write a very long essay."),
        "max_tokens": 4000,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(timeout=30) as http:
        with http.stream(
            "POST", stack.router_url + "/v1/chat/completions", json=body, headers={"x-ppd-policy": "decode"}
        ) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for _ in range(6):
                next(lines)
            # still generating (checked before leaving the loop: closing the iterator closes the connection)
            assert _decode_metrics(stack).running_reqs >= 1
    deadline = time.time() + 5
    while time.time() < deadline and _decode_metrics(stack).running_reqs:
        time.sleep(0.1)
    assert _decode_metrics(stack).running_reqs == 0  # 4000 tokens would take seconds; the backend stopped
    metrics = httpx.get(stack.router_url + "/metrics").text
    assert 'outcome="client_disconnect"' in metrics


def test_return_token_ids_gives_the_same_ids_by_both_routes(client):
    """`return_token_ids` (vLLM's extension) puts the answer's ids in the `ppd` object; greedy output of one prompt
    is the same by the P-route and by the D-route, id for id, streamed or not."""
    messages = fresh("Why move KV at all?")
    got = {}
    for policy in ("prefill", "decode"):
        _, completion = chat(client, messages, policy, extra_body={"return_token_ids": True})
        ids = completion.model_extra["ppd"]["output_ids"]
        assert len(ids) == completion.usage.completion_tokens
        assert TOK.decode(ids) == completion.choices[0].message.content
        got[policy] = ids
    last = chat_stream(client, messages, "prefill", extra_body={"return_token_ids": True})[-1]
    got["stream"] = last.model_extra["ppd"]["output_ids"]
    assert got["prefill"] == got["decode"] == got["stream"]
    _, plain = chat(client, fresh("no ids asked"), "prefill")
    assert "output_ids" not in plain.model_extra["ppd"]
