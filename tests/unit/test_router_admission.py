"""Readiness and admission: GET /ready says whether the configured policy can serve with the servers that are healthy
now (a dead prefill server does not make a router that serves by the D-route unready); the total in-flight limit is
checked before a request is tokenized, and a request being tokenized holds its slot."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
from router_fakes import D_URL, P_URL, make_config, running_router

import router.endpoints as router_endpoints
from ppd.policies import Decision, Route, register

MODEL = "llama-3-8b"


@dataclasses.dataclass(frozen=True)
class NeedsPrefill:
    """A policy that only ever takes the P-route: it cannot serve without a prefill server."""

    name: str = "needs-prefill"

    def score(self, x):
        return ()

    def decide(self, x) -> Decision:
        return Decision(Route.PREFILL, self.name, "always-p", x.cache_rate)


register("needs-prefill", lambda context=None, **_: NeedsPrefill())


async def wait_health(client, backend: str, value: str) -> dict:
    for _ in range(200):
        r = await client.get("/ready")
        if r.json()["backends"][backend] == value:
            return r
        await asyncio.sleep(0.01)
    raise AssertionError(f"{backend} never became {value}")


@pytest.mark.parametrize("policy", ["auto", "prefill", "threshold", "decode"])
async def test_dead_prefill_server_leaves_a_d_route_router_ready(policy):
    cfg, cluster = make_config(policy)
    cluster[P_URL].connect_error = True
    async with running_router(cfg, cluster, ready=False) as (_, client):
        r = await wait_health(client, "prefill0", "unhealthy")
        assert r.status_code == 200, r.json()
        assert r.json() == {
            "ready": True,
            "policy": policy,
            "backends": {"prefill0": "unhealthy", "decode0": "healthy"},
        }
        answer = await client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        )
        assert answer.status_code == 200 and answer.headers["x-ppd-route"] == "decode"
        assert (await client.get("/health")).status_code == 200


async def test_not_ready_when_the_policy_needs_the_dead_prefill_server():
    cfg, cluster = make_config("needs-prefill")
    cluster[P_URL].connect_error = True
    async with running_router(cfg, cluster, ready=False) as (_, client):
        r = await wait_health(client, "prefill0", "unhealthy")
        assert r.status_code == 503 and r.json()["ready"] is False
        cluster[P_URL].connect_error = False  # back: the next health check makes the router ready
        r = await wait_health(client, "prefill0", "healthy")
        assert r.status_code == 200


async def test_not_ready_without_a_d_route_when_decode_servers_cannot_append():
    """Real SGLang without the decode-side extension cannot run the D-route: a dead prefill server is an outage."""
    cfg, cluster = make_config("auto")
    cfg = dataclasses.replace(cfg, backend="sglang")
    cluster[P_URL].connect_error = True
    async with running_router(cfg, cluster, ready=False) as (_, client):
        r = await wait_health(client, "prefill0", "unhealthy")
        assert r.status_code == 503


async def test_not_ready_without_a_healthy_answering_server():
    cfg, cluster = make_config("auto", colocated=1)
    cluster[D_URL].connect_error = True
    async with running_router(cfg, cluster, ready=False) as (_, client):
        r = await wait_health(client, "colocated0", "unhealthy")
        assert r.status_code == 503
        cluster[D_URL].connect_error = False
        assert (await wait_health(client, "colocated0", "healthy")).status_code == 200


def count_tokenizer_calls(state) -> list[str]:
    calls: list[str] = []
    tok = state.tokenizer
    for name in ("encode_chat", "encode"):
        fn = getattr(tok, name)

        def spy(*args, _fn=fn, _name=name, **kw):
            calls.append(_name)
            return _fn(*args, **kw)

        setattr(tok, name, spy)
    return calls


async def test_total_limit_refuses_before_tokenizing():
    cfg, cluster = make_config("decode", max_inflight_total=1)
    cluster[D_URL].token_delay_s = 0.05
    async with running_router(cfg, cluster) as (app, client):
        calls = count_tokenizer_calls(app.state.ppd)
        slow = asyncio.create_task(
            client.post("/v1/completions", json={"model": MODEL, "prompt": "hold the slot", "max_tokens": 10})
        )
        while app.state.ppd.pool.total_inflight() == 0:
            await asyncio.sleep(0.005)
        assert calls == ["encode"]
        for path, body in (
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "refused"}]}),
            ("/v1/completions", {"prompt": "refused too"}),
        ):
            r = await client.post(path, json={"model": MODEL, **body})
            assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
            assert r.json()["error"]["type"] == "rate_limit_exceeded"
        assert calls == ["encode"]  # neither refused request was tokenized
        assert (await slow).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'ppd_admission_rejected_total{reason="total_full"} 2.0' in metrics
        assert 'ppd_requests_total{endpoint="chat",outcome="rejected",route="none"} 1.0' in metrics
        assert 'ppd_requests_total{endpoint="completions",outcome="rejected",route="none"} 1.0' in metrics
        # bad input is still a 400, not a 429, and costs no slot
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 10**9]})
        assert r.status_code == 400
        assert app.state.ppd.router.admitting == 0


async def test_a_request_being_tokenized_holds_its_slot(monkeypatch):
    monkeypatch.setattr(router_endpoints, "TOKENIZE_INLINE_MAX_CHARS", 100)
    cfg, cluster = make_config("decode", max_inflight_total=1)
    async with running_router(cfg, cluster) as (app, client):
        tok = app.state.ppd.tokenizer
        entered, release = threading.Event(), threading.Event()
        encode = tok.encode

        def slow_encode(text):
            if len(text) > 100:
                entered.set()
                release.wait(10)
            return encode(text)

        tok.encode = slow_encode
        long = asyncio.create_task(
            client.post("/v1/completions", json={"model": MODEL, "prompt": "x " * 200, "max_tokens": 2})
        )
        while not entered.is_set():
            await asyncio.sleep(0.005)
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "short", "max_tokens": 2})
        assert r.status_code == 429  # the slot is the long request's, though nothing reached a backend yet
        assert cluster.generate_bodies(D_URL) == []
        release.set()
        assert (await long).status_code == 200
        assert app.state.ppd.router.admitting == 0
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "short", "max_tokens": 2})
        assert r.status_code == 200


async def test_no_healthy_server_is_refused_before_tokenizing():
    cfg, cluster = make_config("decode")
    cluster[D_URL].connect_error = True
    async with running_router(cfg, cluster, ready=False) as (app, client):
        await wait_health(client, "decode0", "unhealthy")
        calls = count_tokenizer_calls(app.state.ppd)
        r = await client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        )
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_backend"
        assert calls == []
