"""Fuzzing the router's OpenAPI schema (schemathesis + hypothesis): valid and invalid bodies, never a 5xx, every error
OpenAI-shaped, and the router answers a plain request afterwards. Backends are the in-process fakes."""

from __future__ import annotations

import schemathesis
from fastapi.testclient import TestClient
from httpx_transport import HttpxTransport
from hypothesis import HealthCheck, given, settings
from router_fakes import make_config
from schemathesis import GenerationMode

from router.app import create_app

EXAMPLES_PER_CASE = 60  # x 2 endpoints x 2 modes = 240 requests


def _fuzz(path: str, mode: GenerationMode) -> int:
    cfg, cluster = make_config("decode", context_length=256)
    app = create_app(cfg, transport=HttpxTransport(cluster.transport))
    op = schemathesis.openapi.from_dict(app.openapi())[path]["POST"]
    seen = []
    with TestClient(app, raise_server_exceptions=False) as client:

        @settings(max_examples=EXAMPLES_PER_CASE, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def check(case):
            if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
                case.body["model"] = "llama-3-8b"  # otherwise nearly every valid body is a 404 for its model
            kwargs = case.as_transport_kwargs(base_url="http://testserver")
            r = client.request(kwargs.pop("method"), kwargs.pop("url"), **kwargs)
            seen.append(r.status_code)
            assert r.status_code < 500, (r.status_code, r.text, case.body)
            if r.status_code >= 400:
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"]

        check()
        ok = client.post("/v1/completions", json={"model": "llama-3-8b", "prompt": "still alive?", "max_tokens": 2})
        assert ok.status_code == 200
    return len(seen)


def test_fuzz_chat_completions():
    n = _fuzz("/v1/chat/completions", GenerationMode.POSITIVE) + _fuzz("/v1/chat/completions", GenerationMode.NEGATIVE)
    assert n >= 2 * EXAMPLES_PER_CASE


def test_fuzz_completions():
    n = _fuzz("/v1/completions", GenerationMode.POSITIVE) + _fuzz("/v1/completions", GenerationMode.NEGATIVE)
    assert n >= 2 * EXAMPLES_PER_CASE
