"""A P-route whose prefill half fails before any token reached the client is retried once by the D-route.

The decode half is aborted first; the retry goes to a decode server by the D-route when the policy takes it there
(every built-in policy falls back to D without a prefill server) and says so: reason `prefill-failed-retry` in
x-ppd-reason and the `ppd` object, and `ppd.retry_of` names the failed attempt. Only when no retry can run does the
client get the 502/503 `prefill_failed`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from router_fakes import D_URL, P_URL, expected_tokens, make_config, running_router

from ppd.policies import Decision, Route, register
from ppd.sglang import protocol
from ppd.tokenizer import ChatTokenizer

MODEL = "llama-3-8b"
TOK = ChatTokenizer.load()
MESSAGES = [{"role": "user", "content": "Tell me about KV caches."}]


@dataclasses.dataclass(frozen=True)
class PrefillOnly:
    """A policy that never takes the D-route, even without a prefill server."""

    name: str = "prefill-only"

    def score(self, x):
        return ()

    def decide(self, x) -> Decision:
        return Decision(Route.PREFILL, self.name, "always-p", x.cache_rate)


register("prefill-only", lambda context=None, **_: PrefillOnly())


def chat(stream: bool = False, max_tokens: int = 5) -> dict:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, "stream": stream}


def sse_chunks(text: str) -> list[dict]:
    blocks = text.strip().split("\n\n")
    assert blocks[-1] == "data: [DONE]"
    return [json.loads(b[len("data: ") :]) for b in blocks[:-1]]


def break_prefill(cluster, failure: str) -> None:
    if failure == "status":
        cluster[P_URL].status = 500  # refused after it was sent
    else:
        cluster[P_URL].drop_after_s = 0.05  # the connection breaks mid-prefill


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("failure", ["status", "dropped"])
async def test_failed_prefill_half_is_retried_by_the_d_route(failure, stream):
    cfg, cluster = make_config("prefill", health_interval_s=60)
    break_prefill(cluster, failure)
    async with running_router(cfg, cluster) as (app, client):
        r = await client.post("/v1/chat/completions", json=chat(stream))
        assert r.status_code == 200, r.text
        metrics = (await client.get("/metrics")).text
        prefill_health = app.state.ppd.pool.prefill[0].health.value
    if stream and failure == "dropped":
        # both servers had accepted the request: the stream started, under the first attempt's headers (the
        # retry's answer follows in it, and its `ppd` object names the route that answered)
        assert r.headers["x-ppd-route"] == "prefill" and r.headers["x-ppd-reason"] == "fixed"
    else:  # refused before the response started: the headers are the retry's
        assert r.headers["x-ppd-route"] == "decode" and r.headers["x-ppd-reason"] == "prefill-failed-retry"
    if stream:
        chunks = sse_chunks(r.text)
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        ppd = chunks[-1]["ppd"]
        assert not any("error" in c for c in chunks)
    else:
        text, ppd = r.json()["choices"][0]["message"]["content"], r.json()["ppd"]
    assert text == TOK.decode(expected_tokens(TOK.encode_chat(MESSAGES), 5))  # the same answer the P-route gives
    assert ppd["route"] == "decode" and ppd["reason"] == "prefill-failed-retry" and ppd["prefill_server"] is None
    assert ppd["retry_of"]["route"] == "prefill" and ppd["retry_of"]["server"] == "prefill0"
    assert ppd["retry_of"]["error"]
    # the decode half of the P-route was aborted before the retry was sent to the same server
    d_log = [(path, body) for path, body in cluster[D_URL].requests if path in ("/generate", "/abort_request")]
    (p_half, abort, retry) = d_log
    assert p_half[0] == "/generate" and p_half[1]["bootstrap_host"] == "10.0.0.1"
    assert abort == ("/abort_request", {"rid": p_half[1]["rid"]})
    assert retry[0] == "/generate" and retry[1]["bootstrap_host"] == protocol.LOCAL_APPEND_HOST
    assert retry[1]["rid"] != p_half[1]["rid"]
    assert 'ppd_retries_total{reason="prefill_failed"} 1.0' in metrics
    assert 'ppd_requests_total{endpoint="chat",outcome="ok",route="decode"} 1.0' in metrics
    assert 'ppd_routing_decisions_total{policy="prefill",reason="prefill-failed-retry",route="decode"} 1.0' in metrics
    assert 'outcome="backend_error"' not in metrics
    # a dropped connection is a dead server until a health check says otherwise; a refusal is not
    assert prefill_health == ("unhealthy" if failure == "dropped" else "healthy")


async def test_decode_abort_blamed_on_a_prefill_failure_that_follows_it():
    """SGLang ends a decode half whose KV never comes with finish_reason abort; when the prefill half's own failure
    arrives a moment later, the request is still a prefill failure, and retried."""
    cfg, cluster = make_config("prefill", health_interval_s=60)
    cluster[D_URL].kv_wait_s = 0.05
    cluster[P_URL].drop_after_s = 0.15
    async with running_router(cfg, cluster) as (_, client):
        r = await client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200, r.text
    assert r.headers["x-ppd-reason"] == "prefill-failed-retry"
    assert "peer closed" in r.json()["ppd"]["retry_of"]["error"]


async def test_decode_abort_with_a_healthy_prefill_half_is_the_decode_servers_error():
    cfg, cluster = make_config("prefill", health_interval_s=60)
    cluster[D_URL].kv_wait_s = 0.05
    cluster[P_URL].first_token_delay_s = 2.0  # still prefilling, fine, when the decode half gives up
    async with running_router(cfg, cluster) as (_, client):
        r = await client.post("/v1/chat/completions", json=chat())
        await asyncio.sleep(0.05)
    assert r.status_code == 502 and r.json()["error"]["code"] == "backend_error", r.text
    assert len(cluster.generate_bodies(D_URL)) == 1  # not retried
    (p_body,) = cluster.generate_bodies(P_URL)
    assert cluster[P_URL].aborted == [p_body["rid"]]  # the prefill half's KV had nowhere to go
    assert cluster[D_URL].aborted == []  # the decode server ended the request itself


async def test_no_retry_when_the_policy_will_not_take_the_d_route():
    cfg, cluster = make_config("prefill-only", health_interval_s=60)
    cluster[P_URL].status = 500
    async with running_router(cfg, cluster) as (_, client):
        r = await client.post("/v1/chat/completions", json=chat())
        metrics = (await client.get("/metrics")).text
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["code"] == "prefill_failed" and "decode half was aborted" in err["message"]
    (p_half,) = cluster.generate_bodies(D_URL)  # only the aborted decode half
    assert cluster[D_URL].aborted == [p_half["rid"]]
    assert 'ppd_requests_total{endpoint="chat",outcome="backend_error",route="prefill"} 1.0' in metrics


async def test_no_retry_when_the_decode_servers_cannot_append_locally():
    """Real SGLang without the decode-side extension has no D-route: the prefill failure is the answer."""
    cfg, cluster = make_config("prefill", health_interval_s=60)
    cfg = dataclasses.replace(cfg, backend="sglang")
    cluster[P_URL].status = 500
    async with running_router(cfg, cluster) as (_, client):
        r = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 502 and r.json()["error"]["code"] == "prefill_failed"
    assert len(cluster.generate_bodies(D_URL)) == 1


async def test_no_retry_when_the_decode_server_is_full():
    """The retry needs an admission slot on a decode server like any request; without one the first error stands."""
    cfg, cluster = make_config("prefill", health_interval_s=60, max_inflight_per_backend=1)
    cluster[P_URL].status = 500
    async with running_router(cfg, cluster) as (app, client):
        router = app.state.ppd.router
        decode = app.state.ppd.pool.decode[0]
        plan = router.plan

        def busy_by_the_retry(*args, **kw):  # another request took the freed slot before the retry asked
            if args[-1] is not None:
                decode.inflight += 1
            return plan(*args, **kw)

        router.plan = busy_by_the_retry
        r = await client.post("/v1/chat/completions", json=chat())
        decode.inflight -= 1
        metrics = (await client.get("/metrics")).text
    assert r.status_code == 502 and r.json()["error"]["code"] == "prefill_failed", r.text
    assert len(cluster.generate_bodies(D_URL)) == 1
    assert 'ppd_admission_rejected_total{reason="backend_full"} 1.0' in metrics


async def test_connect_failure_of_one_prefill_server_retries_on_another():
    """Nothing ran on a server that could not be reached: the request is simply planned without it."""
    cfg, cluster = make_config("prefill", prefill=2, health_interval_s=60)
    async with running_router(cfg, cluster) as (_, client):
        await asyncio.sleep(0.1)  # a metrics poll: both idle; the first is picked
        cluster[P_URL].connect_error = True
        r = await client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200, r.text
    assert r.headers["x-ppd-route"] == "prefill" and r.json()["ppd"]["prefill_server"] == "prefill1"
    assert r.json()["ppd"]["retry_of"]["server"] == "prefill0"
