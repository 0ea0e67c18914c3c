"""The emulated GPU's scheduling and caching, in-process (a fast GPU: time_scale 0.01 keeps every test short)."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest

from ppd.emulator.schemas import RequestError
from ppd.emulator.testing import generate, in_process
from ppd.sglang.protocol import LOCAL_APPEND_HOST


@contextlib.asynccontextmanager
async def running(role: str = "colocated", **kw):
    server = in_process(role, **kw)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def ids(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(10, 120000) for _ in range(n)]


async def test_finished_conversation_is_cached_prompt_and_output():
    async with running() as s:
        turn1 = await generate(s, ids(1000), max_new=16)
        assert turn1.meta["cached_tokens"] == 0 and len(turn1.ids) == 16
        history = ids(1000) + turn1.ids
        turn2 = await generate(s, history + ids(50, seed=1), max_new=4)
        assert turn2.meta["cached_tokens"] == len(history)
        assert turn2.meta["ppd"]["prefill_ms"] < turn1.meta["ppd"]["prefill_ms"]
        # the whole prompt cached: the last token is still computed
        again = await generate(s, history + ids(50, seed=1), max_new=4)
        assert again.meta["cached_tokens"] == len(history) + 50 - 1
        assert again.ids == turn2.ids


async def test_local_append_and_colocated_give_the_same_tokens():
    async with running("colocated") as c, running("decode") as d:
        prompt = ids(3000, seed=3)
        a = await generate(c, prompt, max_new=12)
        b = await generate(d, prompt, max_new=12, bootstrap_host=LOCAL_APPEND_HOST, bootstrap_port=0, bootstrap_room=1)
        assert a.ids == b.ids
        assert b.meta["ppd"]["route"] == "decode" and a.meta["ppd"]["route"] == "colocated"
        # a different prompt gives different tokens
        other = await generate(c, prompt[:-1] + [prompt[-1] + 1], max_new=12)
        assert other.ids != a.ids


async def test_stop_token_and_length():
    async with running() as s:
        base = await generate(s, ids(100), max_new=10)
        assert base.meta["finish_reason"] == {"type": "length", "length": 10}
        stop = base.ids[3]
        stopped = await generate(s, ids(100), max_new=10, sampling_params={"stop_token_ids": [stop]})
        first = base.ids.index(stop)
        assert stopped.ids == base.ids[: first + 1]
        assert stopped.meta["finish_reason"] == {"type": "stop", "matched": stop}
        zero = await generate(s, ids(100), max_new=0)
        assert zero.ids == [] and zero.meta["finish_reason"] == {"type": "length", "length": 0}


async def test_sampling_seed_decides_sampled_tokens():
    async with running() as s:
        p = ids(200)

        async def sample(seed):
            sp = {"temperature": 0.8, "sampling_seed": seed}
            return (await generate(s, p, max_new=8, sampling_params=sp)).ids

        assert await sample(1) == await sample(1)
        assert await sample(1) != await sample(2)
        assert (await generate(s, p, max_new=8)).ids != await sample(1)


async def test_abort_frees_memory_and_ends_the_request():
    async with running(time_scale=0.5) as s:
        run = await generate(s, ids(500), max_new=5000, watch=False)
        while not run.job.output_ids:
            await asyncio.sleep(0.01)
        assert s.engine.num_running == 1 and s.engine.reserved_tokens == 500 + 5000
        assert s.engine.abort(run.job.rid)
        assert run.job.finish_reason["type"] == "abort"
        assert s.engine.num_running == 0 and s.engine.reserved_tokens == 0
        assert not s.engine.abort(run.job.rid)  # already gone


@pytest.mark.parametrize("role", ["colocated", "decode"])
async def test_aborted_request_keeps_the_kv_it_computed(role):
    """SGLang finishes an aborted running request like any other (release_kv_cache inserts kv_committed_len
    tokens): its prompt and every output but the last stay cached, which the router's index assumes
    (`record_partial`). A decode server gets the request as a local append here: the KV is computed in place."""
    async with running(role, time_scale=0.5) as s:
        kw = {"bootstrap_host": LOCAL_APPEND_HOST, "bootstrap_port": 0, "bootstrap_room": 7} if role == "decode" else {}
        prompt = ids(400, seed=5)
        run = await generate(s, prompt, max_new=5000, watch=False, **kw)
        while len(run.job.output_ids) < 3:
            await asyncio.sleep(0.01)
        assert s.engine.abort(run.job.rid)
        kept = prompt + run.job.output_ids[:-1]
        kw = {**kw, "bootstrap_room": 8} if kw else {}
        nxt = await generate(s, kept + ids(20, seed=6), max_new=1, **kw)
        assert nxt.meta["cached_tokens"] == len(kept)


async def test_requests_wait_for_memory_and_cache_stays_in_capacity():
    async with running(kv_capacity_tokens=3000, time_scale=0.05) as s:
        a = await generate(s, ids(1500, 1), max_new=400, watch=False)
        b = await generate(s, ids(1500, 2), max_new=400, watch=False)
        await asyncio.sleep(0.05)
        assert s.engine.awaiting_memory == 1  # 1900 + 1900 > 3000: the second waits
        for r in (a, b):
            await r.job.done.wait()
        assert [r.job.finish_reason["type"] for r in (a, b)] == ["length", "length"]
        first, second = sorted((a.job, b.job), key=lambda j: j.t_prefill_start)
        assert second.t_prefill_start >= first.t_finish
        assert len(s.engine.cache) <= 3000
        with pytest.raises(RequestError, match="KV pool"):
            await generate(s, ids(2000), max_new=1500)


async def test_chunked_prefill_runs_one_chunk_per_iteration():
    async with running(chunk_size=8192) as s:
        before = s.engine.iterations["extend"]
        await generate(s, ids(20000), max_new=1)
        assert s.engine.iterations["extend"] - before == 3


async def test_mode_checks():
    async with running("decode") as d:
        with pytest.raises(RequestError, match="bootstrap_room"):
            await generate(d, ids(10))
    async with running("prefill") as p:
        with pytest.raises(RequestError, match="decode server"):
            await generate(p, ids(10), bootstrap_host=LOCAL_APPEND_HOST, bootstrap_port=0, bootstrap_room=3)
        with pytest.raises(RequestError, match="bootstrap"):
            await generate(p, ids(10))
