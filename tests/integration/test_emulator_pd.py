"""Emulated SGLang servers as real processes on loopback: PD over Mooncake, local append, the HTTP API."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ppd import specs
from ppd.emulator.testing import stack_dict, start_servers, stop_servers
from ppd.sglang.protocol import LOCAL_APPEND_HOST, METRIC_MAX_TOTAL_TOKENS, METRIC_QUEUED, METRIC_RUNNING

pytestmark = pytest.mark.slow
KV_SCALE = 1024


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    cfg = stack_dict(time_scale=0.05, waiting_timeout_s=1.5)
    procs = start_servers(cfg, ("prefill", "decode", "colocated"), tmp_path_factory.mktemp("emu"))
    procs["bootstrap_port"] = cfg["prefill"][0]["bootstrap_port"]
    try:
        yield procs
    finally:
        stop_servers({k: v for k, v in procs.items() if k != "bootstrap_port"})


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(10, 8000) for _ in range(n)]


def body(input_ids, max_new=8, **extra) -> dict:
    return {"input_ids": input_ids, "sampling_params": {"max_new_tokens": max_new, "temperature": 0}, **extra}


async def p_route(client, servers, input_ids, max_new=8, stream=False) -> tuple[dict, dict]:
    room = random.randint(0, 2**63 - 1)
    b = body(input_ids, max_new, bootstrap_host="127.0.0.1", bootstrap_port=servers["bootstrap_port"])
    b.update(bootstrap_room=room, stream=stream)
    p, d = await asyncio.gather(
        client.post(servers["prefill"].url + "/generate", json=b),
        client.post(servers["decode"].url + "/generate", json=b),
    )
    assert p.status_code == 200, p.text
    assert d.status_code == 200, d.text
    return p, d


async def d_route(client, servers, input_ids, max_new=8) -> dict:
    b = body(input_ids, max_new, bootstrap_host=LOCAL_APPEND_HOST, bootstrap_port=0, bootstrap_room=1)
    r = await client.post(servers["decode"].url + "/generate", json=b)
    assert r.status_code == 200, r.text
    return r.json()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k == "direction")))] = s.value
    return out


async def test_three_turn_conversation_same_tokens_by_every_route(servers):
    async with httpx.AsyncClient(timeout=30) as client:
        history: list[int] = []
        for turn in range(3):
            prompt = history + ids(300 + 50 * turn, seed=turn)
            p, d = await p_route(client, servers, prompt)
            p_out, d_out = p.json(), d.json()
            local = await d_route(client, servers, prompt)
            colo = (await client.post(servers["colocated"].url + "/generate", json=body(prompt))).json()
            assert d_out["output_ids"] == local["output_ids"] == colo["output_ids"]
            assert len(d_out["output_ids"]) == 8
            # the prefill half answers with the first token only, like SGLang's PD prefill
            assert p_out["output_ids"] == d_out["output_ids"][:1]
            assert p_out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
            assert d_out["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
            assert d_out["meta_info"]["ppd"]["route"] == "prefill" and local["meta_info"]["ppd"]["route"] == "decode"
            if turn:  # the decode server holds the earlier turns (prompt + generated tokens)
                assert local["meta_info"]["cached_tokens"] >= len(history)
                assert colo["meta_info"]["cached_tokens"] >= len(history)
                assert p_out["meta_info"]["cached_tokens"] >= len(history) - 8  # P caches prompts, not answers
            history = prompt + d_out["output_ids"]


async def test_mooncake_bytes_equal_the_kv_formula_on_both_sides(servers):
    before_p, before_d = scrape(servers["prefill"].url), scrape(servers["decode"].url)
    n = 777
    async with httpx.AsyncClient(timeout=30) as client:
        p, d = await p_route(client, servers, ids(n, seed=99))
    after_p, after_d = scrape(servers["prefill"].url), scrape(servers["decode"].url)
    expected = specs.model("llama-3-8b").kv_bytes_per_token * n // KV_SCALE
    key = "ppd_emulator_kv_transfer_bytes_total"
    sent = after_p[(key, (("direction", "send"),))] - before_p[(key, (("direction", "send"),))]
    received = after_d[(key, (("direction", "recv"),))] - before_d[(key, (("direction", "recv"),))]
    assert sent == received == expected
    assert d.json()["meta_info"]["ppd"]["kv_bytes_wire"] == expected
    assert d.json()["meta_info"]["ppd"]["kv_bytes"] == expected * KV_SCALE
    secs = "ppd_emulator_kv_transfer_seconds_total"
    assert after_p[(secs, (("direction", "send"),))] > before_p[(secs, (("direction", "send"),))]
    assert d.json()["meta_info"]["ppd"]["kv_integrity_ok"] is True


async def test_stream_is_incremental_and_ends_with_done(servers):
    """The default (sglang.incremental_streaming_output, SGLang's --incremental-streaming-output): each chunk carries
    only the ids generated since the previous one."""
    async with httpx.AsyncClient(timeout=30) as client:
        prompt = ids(200, seed=5)
        want = (await client.post(servers["colocated"].url + "/generate", json=body(prompt, 6))).json()["output_ids"]
        room = random.randint(0, 2**62)
        b = body(prompt, 6, bootstrap_host="127.0.0.1", bootstrap_port=servers["bootstrap_port"], bootstrap_room=room)
        b["stream"] = True
        prefill = asyncio.create_task(client.post(servers["prefill"].url + "/generate", json=b))
        lines = []
        async with client.stream("POST", servers["decode"].url + "/generate", json=b) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            async for line in resp.aiter_lines():
                if line:
                    lines.append(line)
        await prefill
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(x[5:]) for x in lines[:-1]]
        assert [i for c in chunks for i in c["output_ids"]] == want
        assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
        assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
        done = 0
        for c in chunks:
            done += len(c["output_ids"])
            assert c["meta_info"]["completion_tokens"] == done


async def test_stream_is_cumulative_without_incremental_output(tmp_path):
    """sglang.incremental_streaming_output: false = SGLang's default stream: every chunk repeats all ids so far."""
    cfg = stack_dict(time_scale=0.05)
    cfg["sglang"] = {"incremental_streaming_output": False}
    procs = start_servers(cfg, ("colocated",), tmp_path)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            prompt = ids(120, seed=6)
            url = procs["colocated"].url + "/generate"
            want = (await client.post(url, json=body(prompt, 6))).json()["output_ids"]
            b = {**body(prompt, 6), "stream": True}
            async with client.stream("POST", url, json=b) as resp:
                chunks = [json.loads(x[5:]) async for x in resp.aiter_lines() if x and x != "data: [DONE]"]
        assert chunks[-1]["output_ids"] == want
        for a, b2 in zip(chunks, chunks[1:], strict=False):
            assert b2["output_ids"][: len(a["output_ids"])] == a["output_ids"]
        assert all(c["meta_info"]["completion_tokens"] == len(c["output_ids"]) for c in chunks)
    finally:
        stop_servers(procs)


async def test_decode_half_without_its_prefill_times_out(servers):
    async with httpx.AsyncClient(timeout=30) as client:
        b = body(ids(50, seed=7), 4, bootstrap_host="127.0.0.1", bootstrap_port=servers["bootstrap_port"])
        b["bootstrap_room"] = 424242
        r = await client.post(servers["decode"].url + "/generate", json=b)
        assert r.status_code == 500
        assert "timed out" in r.json()["error"]["message"]
        b.update(bootstrap_room=434343, stream=True)
        async with client.stream("POST", servers["decode"].url + "/generate", json=b) as resp:
            lines = [x async for x in resp.aiter_lines() if x]
        last = json.loads(lines[-2][5:])
        assert lines[-1] == "data: [DONE]"
        assert last["meta_info"]["finish_reason"]["type"] == "abort"
        assert last["output_ids"] == []


async def test_abort_request_ends_a_running_stream(servers):
    url = servers["colocated"].url
    async with httpx.AsyncClient(timeout=30) as client:
        b = {**body(ids(100, seed=8), 50000), "stream": True, "rid": "to-abort"}
        got = []
        async with client.stream("POST", url + "/generate", json=b) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    got.append(json.loads(line[5:]))
                    if len(got) == 3:
                        assert (await client.post(url + "/abort_request", json={"rid": "to-abort"})).status_code == 200
        assert got[-1]["meta_info"]["finish_reason"]["type"] == "abort"
        assert 3 <= got[-1]["meta_info"]["completion_tokens"] < 50000
        assert sum(len(c["output_ids"]) for c in got) == got[-1]["meta_info"]["completion_tokens"]  # incremental


@pytest.mark.parametrize(
    "payload",
    [
        {"sampling_params": {"max_new_tokens": 4}},
        {"input_ids": []},
        {"input_ids": [1, 2, -3]},
        {"input_ids": [1, 2, 10**9]},
        {"input_ids": "hello", "sampling_params": {"max_new_tokens": 4}},
        {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -1}},
        {"input_ids": [1, 2], "sampling_params": {"temperature": "hot"}},
        {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 10**7}},
        {"input_ids": [[1, 2], [3]]},
        [1, 2, 3],
    ],
)
def test_bad_input_gets_400_json(servers, payload):
    r = httpx.post(servers["colocated"].url + "/generate", json=payload)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]
    assert r.json()["error"]["code"] == 400


def test_bad_bodies_and_modes(servers):
    r = httpx.post(servers["colocated"].url + "/generate", content=b"{not json", headers={"content-type": "x"})
    assert r.status_code == 400
    r = httpx.post(servers["decode"].url + "/generate", json=body([1, 2, 3]))
    assert r.status_code == 400 and "bootstrap_room" in r.json()["error"]["message"]
    r = httpx.post(servers["prefill"].url + "/generate", json=body([1, 2, 3]))
    assert r.status_code == 400
    assert httpx.get(servers["colocated"].url + "/health").status_code == 200


def test_info_endpoints_and_metrics(servers):
    for role in ("prefill", "decode", "colocated"):
        url = servers[role].url
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/health_generate").status_code == 200
        info = httpx.get(url + "/server_info").json()
        assert info["version"] == "0.5.10.post1"
        assert info["disaggregation_mode"] == {"colocated": "null"}.get(role, role)
        assert info["max_total_num_tokens"] > 100000
        assert httpx.get(url + "/get_server_info").status_code == 200
        assert httpx.get(url + "/get_model_info").json()["is_generation"] is True
        models = httpx.get(url + "/v1/models").json()
        assert models["data"][0]["id"] == "llama-3-8b"
        names = {f.name for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
        for name in (
            METRIC_RUNNING,
            METRIC_QUEUED,
            METRIC_MAX_TOTAL_TOKENS,
            "sglang:token_usage",
            "sglang:cache_hit_rate",
        ):
            assert name in names
        assert "ppd_emulator_kv_integrity_errors" in names
    assert httpx.post(servers["colocated"].url + "/flush_cache").status_code == 200
    boot = f"http://127.0.0.1:{servers['bootstrap_port']}"
    assert httpx.get(boot + "/health").text == "OK"
    q = "prefill_dp_rank=-1&prefill_cp_rank=-1&target_tp_rank=-1&target_pp_rank=-1"
    assert httpx.get(f"{boot}/route?{q}").json()["dp_size"] == 1
    assert httpx.get(f"{boot}/route").status_code == 400


def test_client_that_leaves_aborts_its_request(servers):
    url = servers["colocated"].url

    def running() -> float:
        for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
            if fam.name == METRIC_RUNNING:
                return sum(s.value for s in fam.samples)
        raise AssertionError("no running gauge")

    def wait_idle() -> None:
        for _ in range(40):
            if running() == 0:
                break
            time.sleep(0.1)
        assert running() == 0

    payload = body(ids(50, seed=9), 50000)
    with pytest.raises(httpx.ReadTimeout):  # non-stream: the client gives up waiting
        httpx.post(url + "/generate", json=payload, timeout=httpx.Timeout(30, read=0.5))
    wait_idle()
    with httpx.stream("POST", url + "/generate", json={**payload, "stream": True}, timeout=30) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i == 3:
                break  # stream: the client hangs up mid-stream
    wait_idle()
