"""Bad input: schemathesis generates requests from the router's own OpenAPI schema (valid ones and ones that break
it), sent to the real router process in front of emulated backends. No answer may be a 5xx, every error must be an
OpenAI-style body, every 200 a complete answer, and the router must still serve a normal request afterwards.

The stack runs a short context (model.context_length=256) so that generated max_tokens stay cheap, and a fast
emulated GPU (time_scale 0.05)."""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

pytestmark = pytest.mark.slow

MODEL = "llama-3-8b"
CONTEXT = 256
FUZZ_SEED = int(os.environ.get("PPD_FUZZ_SEED", "20261126"))
# examples per (operation, generation mode): the two POST operations carry the bulk of the >= 200 cases
EXAMPLES = {"POST": 60, "GET": 6}
POLICIES = [None, "decode", "prefill", "auto"]
FUZZED = {
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/health"),
    ("GET", "/ppd/model"),
}


@pytest.fixture(scope="module")
def stack(embedded_stack):
    return embedded_stack(extra_overrides=["emulator.time_scale=0.05", f"model.context_length={CONTEXT}"])


def _header(resp, name: str) -> str:
    values = {k.lower(): v for k, v in resp.headers.items()}.get(name, [""])
    return values[0] if isinstance(values, list) else values


def _check_response(method: str, resp) -> str | None:
    """Why this answer is wrong, or None."""
    text = resp.content.decode(errors="replace")
    if resp.status_code >= 500:
        return f"HTTP {resp.status_code}: {text[:300]}"
    if resp.status_code >= 400:
        try:
            err = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            return f"HTTP {resp.status_code} without an OpenAI error body: {text[:300]}"
        if not (isinstance(err.get("message"), str) and err["message"] and {"type", "param", "code"} <= set(err)):
            return f"HTTP {resp.status_code} error body not OpenAI-shaped: {err}"
        return None
    if method == "POST" and resp.status_code == 200:
        if _header(resp, "content-type").startswith("text/event-stream"):
            events = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
            if not events or events[-1] != "[DONE]":
                return f"stream without [DONE]: {text[-300:]}"
            objs = [json.loads(e) for e in events[:-1]]
            if any("error" in o for o in objs):
                return f"error event in a stream: {text[-300:]}"
            if not any(c.get("finish_reason") for o in objs for c in o.get("choices") or []):
                return "stream without a finish_reason"
        else:
            body = json.loads(text)
            if not body.get("choices") or body["choices"][0].get("finish_reason") is None:
                return f"answer without a finished choice: {text[:300]}"
    return None


@dataclass
class Tally:
    cases: collections.Counter = field(default_factory=collections.Counter)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)


def fuzz_operation(op, mode: GenerationMode, base: str, session: requests.Session, tally: Tally) -> None:
    """Run EXAMPLES[method] generated cases of one operation in one mode against the router at `base`."""
    method = op.method.upper()
    label = f"{method} {op.path} {mode.value}"

    @seed(FUZZ_SEED)
    @settings(
        max_examples=EXAMPLES[method],
        deadline=None,
        database=None,
        phases=[Phase.generate],  # bounded time: no shrinking; failures are collected, not minimised
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode), real_model=st.booleans(), policy=st.sampled_from(POLICIES))
    def run(case, real_model: bool, policy: str | None) -> None:
        # half the valid bodies name the served model, so they get past the 404 and reach the backends
        if mode is GenerationMode.POSITIVE and real_model and isinstance(case.body, dict):
            case.body["model"] = MODEL
        headers = {"x-ppd-policy": policy} if policy else None
        # sent by requests itself, not `case.call`: schemathesis stops reading an event stream after 20 events and
        # closes the connection, which cut long answers short (no [DONE]) whenever they ran to more events
        resp = session.request(**case.as_transport_kwargs(base_url=base, headers=headers), timeout=30)
        tally.cases[label] += 1
        tally.statuses[resp.status_code] += 1
        why = _check_response(method, resp)
        if why:
            tally.failures.append(f"{label} headers={headers} body={str(case.body)[:300]}: {why}")

    run()


def test_fuzz_openapi_no_5xx(stack):
    base = stack.router_url
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    operations = {(op.method.upper(), op.path): op for op in (r.ok() for r in schema.get_all_operations())}
    assert set(operations) >= FUZZED  # the schema covers every endpoint we fuzz
    tally = Tally()
    with requests.Session() as session:
        for key in sorted(FUZZED):
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    fuzz_operation(operations[key], mode, base, session, tally)
                except Unsatisfiable:  # a GET without parameters has no invalid form
                    assert key[0] == "GET" and mode is GenerationMode.NEGATIVE, key
    total = sum(tally.cases.values())
    print(f"fuzz: {total} cases, statuses {dict(tally.statuses)}; {dict(tally.cases)}")
    assert not tally.failures, "\n".join(tally.failures[:20])
    assert total >= 200
    assert tally.statuses[200] >= 20  # enough valid requests reached the backends and were answered
    assert stack.alive()
    ok = httpx.post(
        base + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4},
        timeout=30,
    )
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_prompt_beyond_the_context_is_a_400_naming_the_limit(stack, endpoint):
    long_text = " word" * (CONTEXT + 50)
    if endpoint == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": long_text}]}
        param = "messages"
    else:
        path, body = "/v1/completions", {"prompt": long_text}
        param = "prompt"
    resp = httpx.post(stack.router_url + path, json={"model": MODEL, "max_tokens": 4, **body}, timeout=30)
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert f"maximum context length is {CONTEXT} tokens" in err["message"]
    assert err["code"] == "context_length_exceeded" and err["param"] == param
    assert err["type"] == "invalid_request_error"
    # a prompt that fits but a max_tokens that does not: the same 400, naming both numbers
    resp = httpx.post(
        stack.router_url + path,
        json={
            "model": MODEL,
            "max_tokens": CONTEXT,
            **({"prompt": "hi"} if endpoint != "chat" else {"messages": [{"role": "user", "content": "hi"}]}),
        },
        timeout=30,
    )
    assert resp.status_code == 400 and f"{CONTEXT} tokens" in resp.json()["error"]["message"]


# Any code point, lone surrogates included: JSON can carry "\ud800" escapes that no UTF-8 string holds, and
# schemathesis (like hypothesis' default text()) never generates them.
ANY_TEXT = st.one_of(
    st.text(st.characters(categories=("L", "M", "N", "P", "S", "Z", "C")), max_size=40),
    st.text(st.characters(categories=("Cs", "Ll", "Zs", "Cc")), max_size=12),  # surrogates are 0.2% of Unicode
)


def test_fuzz_any_unicode_text_no_5xx(stack):
    """Message contents, prompts and stop strings over all of Unicode: a 200 or a 400, never a 5xx."""
    seen: collections.Counter[int | str] = collections.Counter()
    with httpx.Client(base_url=stack.router_url, timeout=30) as http:

        @seed(FUZZ_SEED)
        @settings(max_examples=60, deadline=None, database=None, phases=[Phase.generate])
        @given(text=ANY_TEXT, stop=st.one_of(st.none(), ANY_TEXT), chat=st.booleans())
        def run(text: str, stop: str | None, chat: bool) -> None:
            body = {"model": MODEL, "max_tokens": 2, **({"stop": stop} if stop is not None else {})}
            if chat:
                path, body = "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}
            else:
                path, body = "/v1/completions", {**body, "prompt": text}
            # json.dumps escapes lone surrogates (ensure_ascii), exactly what a client's JSON library sends
            resp = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
            seen[resp.status_code] += 1
            seen["surrogates"] += any(0xD800 <= ord(c) <= 0xDFFF for c in text + (stop or ""))
            assert resp.status_code in (200, 400), f"{path} {body!r}: HTTP {resp.status_code} {resp.text[:300]}"
            if resp.status_code == 400:
                assert resp.json()["error"]["message"]

        run()
    print(f"unicode fuzz: {dict(seen)}")
    assert seen[200] > 0 and seen["surrogates"] > 0
