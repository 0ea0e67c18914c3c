"""The exact JSON the router sends to SGLang servers on each route (mini_lb's fields for the P-route)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from httpx_transport import HttpxTransport
from router_fakes import D_URL, P_URL, make_config, running_router

from ppd.sglang import protocol
from ppd.sglang.client import DeltaIds, SGLangClient, parse_metrics
from ppd.tokenizer import ChatTokenizer

CHAT = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "Tell me about KV caches."}]}
P_ROUTE_KEYS = {"input_ids", "sampling_params", "stream", "rid", "bootstrap_host", "bootstrap_port", "bootstrap_room"}


def test_bootstrap_room_is_63_bit():
    rooms = {protocol.new_bootstrap_room() for _ in range(2000)}
    assert all(isinstance(r, int) and 0 <= r < 2**63 for r in rooms)
    assert len(rooms) == 2000
    assert max(rooms) > 2**62  # uses the whole range, like mini_lb's random.randint(0, 2**63 - 1)


def test_rids_are_32_hex_digits_and_unique():
    rids = [protocol.new_rid() for _ in range(5000)]
    assert all(len(r) == 32 and int(r, 16) >= 0 for r in rids)  # uuid4().hex's shape
    assert len(set(rids)) == len(rids)
    assert any(r.startswith("0") for r in rids)  # zero-padded: all 128 bits


def test_bodies_match_mini_lb():
    body = protocol.generate_body([1, 2, 3], {"max_new_tokens": 4}, stream=True, rid="r1")
    assert body == {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4}, "stream": True, "rid": "r1"}
    p = protocol.with_bootstrap(body, "10.0.0.1", 8998, 42)
    assert p == {**body, "bootstrap_host": "10.0.0.1", "bootstrap_port": 8998, "bootstrap_room": 42}
    assert "bootstrap_host" not in body  # a copy, as mini_lb's request_data.copy()
    d = protocol.local_append(body, 7)
    assert d["bootstrap_host"] == protocol.LOCAL_APPEND_HOST == "ppd-local-append"
    assert (d["bootstrap_port"], d["bootstrap_room"]) == (0, 7)
    assert protocol.is_local_append(d) and not protocol.is_local_append(p)


def test_bootstrap_hostname_like_mini_lb():
    assert protocol.bootstrap_hostname("http://10.0.0.1:30100") == "10.0.0.1"
    assert protocol.bootstrap_hostname("http://[::1]:30100") == "[::1]"  # maybe_wrap_ipv6_address
    assert protocol.bootstrap_hostname("http://prefill-0.svc:30100") == "prefill-0.svc"


def test_delta_ids_cumulative_and_incremental():
    cum = DeltaIds()
    assert cum.feed(protocol.GenerateOutput([5], {"completion_tokens": 1})) == [5]
    assert cum.feed(protocol.GenerateOutput([5, 6, 7], {"completion_tokens": 3})) == [6, 7]
    inc = DeltaIds()
    assert inc.feed(protocol.GenerateOutput([5], {"completion_tokens": 1})) == [5]
    assert inc.feed(protocol.GenerateOutput([6, 7], {"completion_tokens": 3})) == [6, 7]
    assert inc.ids == cum.ids == [5, 6, 7]


def test_parse_metrics_sums_label_sets():
    text = (
        "# TYPE sglang:num_running_reqs gauge\n"
        'sglang:num_running_reqs{model_name="m",dp="0"} 3\n'
        'sglang:num_running_reqs{model_name="m",dp="1"} 2\n'
        "# TYPE sglang:num_queue_reqs gauge\n"
        'sglang:num_queue_reqs{model_name="m"} 7\n'
        "# TYPE sglang:token_usage gauge\n"
        'sglang:token_usage{model_name="m"} 0.5\n'
        "# TYPE sglang:num_used_tokens gauge\n"
        'sglang:num_used_tokens{model_name="m"} 1234\n'
    )
    m = parse_metrics(text)
    assert (m.running_reqs, m.queued_reqs, m.token_usage, m.used_tokens) == (5, 7, 0.5, 1234)


async def test_client_abort_posts_rid():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.content))
        return httpx.Response(200)

    net = HttpxTransport(httpx.MockTransport(handler))
    assert await SGLangClient(net).abort("http://d:1", "abc")
    await net.aclose()
    assert seen == [("/abort_request", b'{"rid":"abc"}')]


async def test_p_route_sends_the_same_body_to_prefill_and_decode():
    cfg, cluster = make_config("prefill")
    async with running_router(cfg, cluster) as (_, client):
        req = {
            **CHAT,
            "max_tokens": 5,
            "temperature": 0.0,
            "top_p": 0.9,
            "seed": 7,
            "stop": ["zzz"],
            "stop_token_ids": [9],
        }
        r = await client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200, r.text
    assert r.headers["x-ppd-route"] == "prefill"
    (p_body,), (d_body,) = cluster.generate_bodies(P_URL), cluster.generate_bodies(D_URL)
    assert p_body == d_body  # mini_lb: one modified_request to both
    assert set(p_body) == P_ROUTE_KEYS
    assert p_body["bootstrap_host"] == "10.0.0.1" and p_body["bootstrap_port"] == 8998
    room = p_body["bootstrap_room"]
    assert isinstance(room, int) and not isinstance(room, bool) and 0 <= room < 2**63
    # stop strings stay with the router (it detokenizes); everything else maps to SGLang's names
    assert p_body["sampling_params"] == {
        "max_new_tokens": 5,
        "temperature": 0.0,
        "top_p": 0.9,
        "sampling_seed": 7,
        "stop_token_ids": [9],
    }
    assert p_body["stream"] is True and isinstance(p_body["input_ids"], list)
    assert p_body["input_ids"] == ChatTokenizer.load().encode_chat(CHAT["messages"])  # the chat template's ids


async def test_p_route_sends_both_halves_prefill_first():
    """Both halves leave in one event-loop turn, the prefill's first (as sglang-router sends them)."""
    cfg, cluster = make_config("prefill")
    async with running_router(cfg, cluster) as (_, client):
        for _ in range(3):
            r = await client.post("/v1/completions", json={"model": "llama-3-8b", "prompt": [5, 6, 7], "max_tokens": 2})
            assert r.status_code == 200 and r.headers["x-ppd-route"] == "prefill"
    generates = [url for url, path in cluster.arrivals if path == "/generate"]
    assert generates == [P_URL, D_URL] * 3


async def test_d_route_goes_to_decode_only_as_local_append():
    cfg, cluster = make_config("decode")
    async with running_router(cfg, cluster) as (_, client):
        r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
    assert r.status_code == 200 and r.headers["x-ppd-route"] == "decode"
    assert cluster.generate_bodies(P_URL) == []
    (body,) = cluster.generate_bodies(D_URL)
    assert set(body) == P_ROUTE_KEYS
    assert body["bootstrap_host"] == protocol.LOCAL_APPEND_HOST and body["bootstrap_port"] == 0
    assert 0 <= body["bootstrap_room"] < 2**63
    assert body["sampling_params"] == {"max_new_tokens": 3}


async def test_colocated_sends_a_plain_body():
    cfg, cluster = make_config("decode", colocated=1, decode=2)
    async with running_router(cfg, cluster) as (_, client):
        r = await client.post("/v1/completions", json={"model": "llama-3-8b", "prompt": [11, 12, 13], "max_tokens": 2})
    assert r.status_code == 200 and r.headers["x-ppd-route"] == "colocated"
    bodies = [b for u in cluster.servers for b in cluster.generate_bodies(u)]
    assert len(bodies) == 1
    assert set(bodies[0]) == {"input_ids", "sampling_params", "stream", "rid"}
    assert bodies[0]["input_ids"] == [11, 12, 13]


@pytest.mark.parametrize("failure", ["status", "connect"])
async def test_prefill_failure_aborts_the_decode_half(failure):
    cfg, cluster = make_config("prefill", health_interval_s=60)
    async with running_router(cfg, cluster) as (_, client):
        if failure == "status":
            cluster[P_URL].status = 500
        else:
            cluster[P_URL].connect_error = True
        r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})
        await asyncio.sleep(0.05)  # aborts are sent in the background
        metrics = (await client.get("/metrics")).text
    (first_decode, retry) = cluster.generate_bodies(D_URL)
    assert cluster[D_URL].aborted[0] == first_decode["rid"]  # the decode half did not wait for its timeout
    assert 'ppd_backend_aborts_total{backend="decode0"} 1.0' in metrics
    # nothing reached the client yet: the request is served by the D-route instead (tests/unit/test_router_retry.py)
    assert r.status_code == 200, r.text
    assert r.headers["x-ppd-route"] == "decode" and r.headers["x-ppd-reason"] == "prefill-failed-retry"
    assert retry["bootstrap_host"] == protocol.LOCAL_APPEND_HOST and retry["rid"] != first_decode["rid"]


async def test_decode_failure_aborts_the_prefill_half():
    cfg, cluster = make_config("prefill")
    async with running_router(cfg, cluster) as (_, client):
        cluster[D_URL].status = 500
        cluster[P_URL].first_token_delay_s = 0.5  # still prefilling when the decode half fails
        r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})
        await asyncio.sleep(0.05)
    assert r.status_code == 502 and r.json()["error"]["code"] == "backend_error"
    (p_body,) = cluster.generate_bodies(P_URL)
    assert cluster[P_URL].aborted == [p_body["rid"]]
