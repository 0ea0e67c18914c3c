"""Routing behaviour against fake backends: prefix affinity, multi-turn reuse, stop strings, timeouts, admission
control, failover, policy overrides and observations, calibration persistence."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass, field

import pytest
from router_fakes import D2_URL, D_URL, P2_URL, P_URL, expected_tokens, make_config, running_router

from ppd.policies import Decision, Route, RoutingInput, register
from ppd.policies.base import Observation
from ppd.tokenizer import ChatTokenizer

MODEL = "llama-3-8b"
TOK = ChatTokenizer.load()


def chat(messages, max_tokens=6, **kw):
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens, **kw}


@dataclass
class Recorder:
    """A test policy: fixed route, remembers what it was shown and what it observed; persists a counter."""

    route: Route = Route.PREFILL
    name: str = "recorder"
    inputs: list[RoutingInput] = field(default_factory=list)
    observed: list[Observation] = field(default_factory=list)
    restored: dict | None = None

    def score(self, x):
        return ()

    def decide(self, x: RoutingInput) -> Decision:
        self.inputs.append(x)
        return Decision(self.route, self.name, "test", x.cache_rate)

    def observe(self, obs: Observation) -> None:
        self.observed.append(obs)

    def export_state(self) -> dict:
        return {"observations": len(self.observed)}

    def restore_state(self, state: dict) -> bool:
        self.restored = state
        return True


register("recorder", lambda context=None, **params: Recorder(**params))


async def test_three_turn_conversation_reuses_the_decode_cache():
    cfg, cluster = make_config("decode")
    async with running_router(cfg, cluster) as (_, client):
        messages = [{"role": "user", "content": "Explain prefix caching in two sentences."}]
        expected_cached = 0
        for turn in range(3):
            r = await client.post("/v1/chat/completions", json=chat(messages, 7), headers={"x-ppd-conversation": "c1"})
            assert r.status_code == 200, r.text
            body = r.json()
            prompt = TOK.encode_chat(messages)
            assert int(r.headers["x-ppd-decode-cached-tokens"]) == expected_cached
            # the fake server reports its own radix-cache hit; it agrees with the router's index to the token
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == expected_cached
            if turn:
                assert expected_cached > 0
            # the server keeps prompt + output but the last token; the next turn starts with exactly those ids
            expected_cached = len(prompt) + 7 - 1
            messages = messages + [
                {"role": "assistant", "content": body["choices"][0]["message"]["content"]},
                {"role": "user", "content": f"And turn {turn + 2}?"},
            ]


async def test_stop_string_cuts_text_and_aborts_the_backend():
    cfg, cluster = make_config("decode")
    messages = [{"role": "user", "content": "stop test"}]
    full = TOK.decode(expected_tokens(TOK.encode_chat(messages), 40))
    stop = full[len(full) // 3 : len(full) // 3 + 4]
    cut = full[: full.index(stop)]
    cluster[D_URL].token_delay_s = 0.01
    async with running_router(cfg, cluster) as (_, client):
        r = await client.post("/v1/chat/completions", json=chat(messages, 40, stop=[stop, "never-appears"]))
        body = r.json()
        assert body["choices"][0]["message"]["content"] == cut
        assert body["choices"][0]["finish_reason"] == "stop"
        await asyncio.sleep(0.05)
        assert cluster[D_URL].aborted == [cluster.generate_bodies(D_URL)[0]["rid"]]
        assert cluster[D_URL].served_tokens < 40  # the backend stopped generating

        r = await client.post("/v1/chat/completions", json=chat(messages, 40, stop=stop, stream=True))
        chunks = [json.loads(b[6:]) for b in r.text.strip().split("\n\n")[:-1]]
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert streamed == cut


@pytest.mark.parametrize("stream", [False, True])
async def test_first_token_timeout(stream):
    cfg, cluster = make_config("decode", first_token_timeout_s=0.2)
    cluster[D_URL].first_token_delay_s = 2.0
    async with running_router(cfg, cluster) as (_, client):
        r = await client.post("/v1/chat/completions", json=chat([{"role": "user", "content": "x"}], stream=stream))
        if stream:  # the server had accepted it: the stream had started, and the error is its one event
            assert r.status_code == 200 and r.headers["x-ppd-route"] == "decode"
            events = r.text.strip().split("\n\n")
            assert len(events) == 2 and events[-1] == "data: [DONE]"
            error = json.loads(events[0][6:])["error"]
        else:
            assert r.status_code == 504
            error = r.json()["error"]
        assert error["code"] == "first_token_timeout" and "0.2 s" in error["message"]
        await asyncio.sleep(0.05)
        assert cluster[D_URL].aborted == [cluster.generate_bodies(D_URL)[0]["rid"]]
        assert 'outcome="timeout"' in (await client.get("/metrics")).text


async def test_inter_token_timeout():
    cfg, cluster = make_config("decode", inter_token_timeout_s=0.1)
    cluster[D_URL].token_delay_s = 1.0
    async with running_router(cfg, cluster) as (_, client):
        r = await client.post("/v1/chat/completions", json=chat([{"role": "user", "content": "x"}]))
        assert r.status_code == 504 and r.json()["error"]["code"] == "inter_token_timeout"
        # in a stream the headers are gone already: the error arrives as an event, then [DONE]
        r = await client.post("/v1/chat/completions", json=chat([{"role": "user", "content": "x"}], stream=True))
        assert r.status_code == 200
        events = r.text.strip().split("\n\n")
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["error"]["code"] == "inter_token_timeout"
        await asyncio.sleep(0.05)
        assert len(cluster[D_URL].aborted) == 2


async def test_admission_control_429_with_retry_after():
    cfg, cluster = make_config("decode", decode=2, max_inflight_per_backend=1, max_inflight_total=2)
    for url in (D_URL, D2_URL):
        cluster[url].token_delay_s = 0.05
    async with running_router(cfg, cluster) as (_, client):
        slow = [
            asyncio.create_task(
                client.post("/v1/completions", json={"model": MODEL, "prompt": f"p{i}", "max_tokens": 10})
            )
            for i in range(2)
        ]
        await asyncio.sleep(0.1)
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "third", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_exceeded"
        done = await asyncio.gather(*slow)
        assert [d.status_code for d in done] == [200, 200]
        assert {d.json()["ppd"]["decode_server"] for d in done} == {"decode0", "decode1"}  # least loaded
        metrics = (await client.get("/metrics")).text
        assert "ppd_admission_rejected_total" in metrics and 'outcome="rejected"' in metrics
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "later", "max_tokens": 2})
        assert r.status_code == 200  # slots come back


async def test_decode_affinity_and_failover():
    cfg, cluster = make_config("decode", decode=2, health_interval_s=60)
    async with running_router(cfg, cluster) as (app, client):
        messages = [{"role": "user", "content": "long shared context " * 20}]
        first = await client.post("/v1/chat/completions", json=chat(messages))
        home = first.json()["ppd"]["decode_server"]
        messages += [
            {"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
            {"role": "user", "content": "more"},
        ]
        second = await client.post("/v1/chat/completions", json=chat(messages))
        assert second.json()["ppd"]["decode_server"] == home  # longest cached prefix wins
        assert int(second.headers["x-ppd-decode-cached-tokens"]) > 0
        # the conversation's server dies: the request is re-planned elsewhere with L = 0 and still answered
        cluster[D_URL if home == "decode0" else D2_URL].connect_error = True
        messages += [
            {"role": "assistant", "content": second.json()["choices"][0]["message"]["content"]},
            {"role": "user", "content": "and more"},
        ]
        third = await client.post("/v1/chat/completions", json=chat(messages))
        assert third.status_code == 200, third.text
        assert third.json()["ppd"]["decode_server"] != home
        assert third.headers["x-ppd-decode-cached-tokens"] == "0"
        state = app.state.ppd
        dead = next(b for b in state.pool.decode if b.name == home)
        assert dead.health.value == "unhealthy" and dead.index.total_tokens == 0  # its cache is presumed lost


async def test_prefill_least_loaded():
    cfg, cluster = make_config("prefill", prefill=2)
    cluster[P_URL].running = 50  # busy per its /metrics
    async with running_router(cfg, cluster) as (_, client):
        await asyncio.sleep(0.15)  # a metrics poll
        r = await client.post("/v1/chat/completions", json=chat([{"role": "user", "content": "hi"}]))
        assert r.json()["ppd"]["prefill_server"] == "prefill1"
        assert cluster.generate_bodies(D_URL)[0]["bootstrap_host"] == "10.0.0.3"
        assert cluster.generate_bodies(P2_URL) and not cluster.generate_bodies(P_URL)


async def test_policy_header_override_and_observations():
    cfg, cluster = make_config("recorder")
    async with running_router(cfg, cluster) as (app, client):
        router = app.state.ppd.router
        recorder = router.default_policy
        msgs = [{"role": "user", "content": "observe me"}]
        r = await client.post("/v1/chat/completions", json=chat(msgs), headers={"x-ppd-conversation": "k"})
        assert r.headers["x-ppd-route"] == "prefill" and r.headers["x-ppd-policy"] == "recorder"
        r = await client.post(
            "/v1/chat/completions", json=chat(msgs), headers={"x-ppd-policy": "decode", "x-ppd-conversation": "k"}
        )
        assert r.headers["x-ppd-route"] == "decode" and r.headers["x-ppd-policy"] == "decode"
        decode_policy = router.policy("decode")
        await client.post("/v1/chat/completions", json=chat(msgs), headers={"x-ppd-policy": "decode"})
        assert router.policy("decode") is decode_policy  # one instance per name
        await client.post("/v1/chat/completions", json=chat(msgs), headers={"x-ppd-conversation": "k"})
        assert recorder.inputs[-1].previous_route is Route.DECODE  # the conversation's last route
        obs = recorder.observed
        assert [o.route for o in obs] == [Route.PREFILL, Route.DECODE, Route.DECODE, Route.PREFILL]
        p_obs = obs[0]
        prompt = len(TOK.encode_chat(msgs))
        assert p_obs.prompt_tokens == prompt and p_obs.completion_tokens == 6
        assert p_obs.ttft_ms > 0 and p_obs.e2e_ms >= p_obs.ttft_ms and p_obs.tpot_ms is not None
        assert p_obs.kv_bytes == prompt * 128 * 1024  # Llama-3-8B: 128 KiB of KV per token
        assert p_obs.server_timings["prefill_ms"] == 1.5  # from the prefill server's meta_info.ppd
        assert obs[1].kv_bytes == 0 and obs[1].decode_cached_tokens == prompt - 1


async def test_index_corrected_by_backend_report():
    cfg, cluster = make_config("decode")
    async with running_router(cfg, cluster) as (app, client):
        msgs = [{"role": "user", "content": "correct me " * 10}]
        await client.post("/v1/chat/completions", json=chat(msgs))
        cluster[D_URL].cache.clear()  # the server evicted everything behind the router's back
        r = await client.post("/v1/chat/completions", json=chat(msgs))
        assert int(r.headers["x-ppd-decode-cached-tokens"]) > 0  # what the router believed
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # what the server had
        assert 'ppd_prefix_index_corrections_total{backend="decode0"} 1.0' in (await client.get("/metrics")).text


async def test_colocated_prefix_affinity():
    cfg, cluster = make_config("decode", colocated=1, decode=2)
    async with running_router(cfg, cluster) as (_, client):
        msgs = [{"role": "user", "content": "colocated " * 10}]
        a = await client.post("/v1/chat/completions", json=chat(msgs))
        b = await client.post("/v1/chat/completions", json=chat(msgs))
        assert a.headers["x-ppd-route"] == b.headers["x-ppd-route"] == "colocated"
        assert a.json()["ppd"]["decode_server"] == b.json()["ppd"]["decode_server"]
        assert b.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


async def test_calibration_persisted(tmp_path):
    path = tmp_path / "calib.json"
    path.write_text(json.dumps({"observations": 41}))
    cfg, cluster = make_config("recorder", calibration_path=str(path))
    async with running_router(cfg, cluster) as (app, client):
        assert app.state.ppd.router.default_policy.restored == {"observations": 41}
        await client.post("/v1/chat/completions", json=chat([{"role": "user", "content": "x"}]))
    assert json.loads(path.read_text()) == {"observations": 1}  # saved at shutdown


async def test_prefill_slot_frees_when_its_half_is_done_not_when_decoding_ends():
    """A decoding P-route stream must not count as queued work on the prefill server (a phantom queue in T_P)."""
    cfg, cluster = make_config("prefill")
    cluster.servers[D_URL].token_delay_s = 0.05  # decoding lasts ~0.5 s, the prefill half returns at once
    async with running_router(cfg, cluster) as (app, client):
        task = asyncio.create_task(
            client.post("/v1/chat/completions", json=chat([{"role": "user", "content": "hi"}], 10))
        )
        pool = app.state.ppd.pool
        for _ in range(200):  # until the decode half streams: the prefill half is over by then
            if cluster.servers[D_URL].served_tokens >= 2:
                break
            await asyncio.sleep(0.01)
        assert not task.done()
        assert pool.prefill[0].inflight == 0
        assert pool.decode[0].inflight == 1
        r = await task
        assert r.status_code == 200 and r.headers["x-ppd-route"] == "prefill"
        assert pool.prefill[0].inflight == 0 and pool.decode[0].inflight == 0


async def test_stock_sglang_decode_never_gets_a_local_append():
    """Real SGLang without ppd.sglang.ext cannot append on the decode server: a D decision becomes the P-route."""
    cfg, cluster = make_config("decode")
    cfg = dataclasses.replace(cfg, backend="sglang")
    async with running_router(cfg, cluster) as (_, client):
        r = await client.post("/v1/chat/completions", json=chat([{"role": "user", "content": "hi"}]))
        assert r.status_code == 200
        assert r.headers["x-ppd-route"] == "prefill"
        assert r.headers["x-ppd-reason"] == "no-local-append"
