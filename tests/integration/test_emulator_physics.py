"""The emulated GPU keeps roofline time: prefill, decode steps, and the stall a local append puts on running decodes.

In-process servers (no HTTP: less CPU noise on a shared box); times are wall clock divided by time_scale and compared
with ppd.roofline within 10 %.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics

import pytest

from ppd import roofline
from ppd.emulator.testing import follow, generate, in_process
from ppd.sglang.protocol import LOCAL_APPEND_HOST

pytestmark = pytest.mark.slow
LOCAL = {"bootstrap_host": LOCAL_APPEND_HOST, "bootstrap_port": 0, "bootstrap_room": 1}


@contextlib.asynccontextmanager
async def running(role: str, time_scale: float, **kw):
    server = in_process(role, time_scale=time_scale, **kw)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(10, 120000) for _ in range(n)]


async def test_prefill_time_follows_the_roofline_and_is_super_linear():
    scale = 0.5
    async with running("colocated", scale) as s:
        got = {}
        for n in (8192, 32768):
            ttfts = []
            for k in range(3):  # fresh prompts; wall-clock noise only adds time: the least of three is the GPU's
                run = await generate(s, ids(n, n + k), max_new=1)
                ttfts.append((run.token_times[0] - run.job.arrival) * 1e3 / scale)
            want_ms = roofline.prefill_time_s(s.model, s.gpu, n, 0, 8192) * 1e3
            reported = run.meta["ppd"]["prefill_ms"]
            host_ms = roofline.request_overhead_s(n) * 1e3
            assert reported == pytest.approx(want_ms, rel=0.10)
            assert min(ttfts) == pytest.approx(host_ms + want_ms, rel=0.10)
            got[n] = reported
        assert got[32768] > 1.5 * 4 * got[8192]  # 4x the tokens, more than 6x the time


async def tpot_ms(s, prompts, max_new: int, scale: float) -> tuple[float, float]:
    """Decode a batch together; (measured TPOT, roofline step at the batch's mean KV), emulated ms."""
    runs = [await generate(s, p, max_new=max_new, watch=False) for p in prompts]
    runs = await asyncio.gather(*(follow(r) for r in runs))
    times = runs[0].token_times
    # steps where the whole batch decodes: after every request's first token
    start = max(r.token_times[0] for r in runs)
    steady = [t for t in times if t > start]
    measured = (steady[-1] - steady[0]) / (len(steady) - 1) * 1e3 / scale
    mean_kv = sum(len(p) for p in prompts) + len(prompts) * max_new // 2
    return measured, roofline.decode_step_time_s(s.model, s.gpu, len(prompts), mean_kv) * 1e3


async def test_decode_step_follows_the_roofline_and_grows_with_batch_kv():
    scale = 4.0  # a 5 ms emulated step lasts 20 ms of wall time: a loaded 2-core box's ~1 ms jitter stays < 10 %
    async with running("colocated", scale) as s:
        short, want_short = await tpot_ms(s, [ids(64, 100 + i) for i in range(8)], 40, scale)
        base = ids(16384, 7)
        await generate(s, base, max_new=1)  # cached: the long batch below prefills only its suffixes
        long, want_long = await tpot_ms(s, [base + ids(16, 200 + i) for i in range(8)], 40, scale)
    assert short == pytest.approx(want_short, rel=0.10)
    assert long == pytest.approx(want_long, rel=0.10)
    assert long > 1.5 * short


async def measure_stall(seed: int) -> tuple[float, float, float, float]:
    """One append of 2048 tokens on 16384 cached, on a decode server running 8 streams.

    Returns (median over streams of the mean step before the append, median over streams of the longest gap while
    the append waited for its first token; both emulated ms) and the roofline's (step, append prefill) in ms.
    """
    scale = 1.0
    async with running("decode", scale) as s:
        prefix = ids(16384, seed)
        await generate(s, prefix, max_new=1, **LOCAL)  # the conversation so far, cached on this decode server
        others = [await generate(s, ids(256, 300 + seed + i), max_new=400, watch=False, **LOCAL) for i in range(8)]
        followers = [asyncio.create_task(follow(r)) for r in others]
        while min(len(r.job.output_ids) for r in others) < 15:
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        t_send = loop.time()
        append = await generate(s, prefix + ids(2048, seed + 1), max_new=2, **LOCAL)
        t_first = append.token_times[0]
        while min(len(r.job.output_ids) for r in others) < 40:
            await asyncio.sleep(0.01)
        for r in others:
            s.engine.abort(r.job.rid)
        await asyncio.gather(*followers)

    assert append.meta["cached_tokens"] == 16384
    gaps, steps = [], []
    for r in others:
        ts = r.token_times
        # the mean step over each stream's last 10 steps before the append: a token the event loop delivered late is
        # followed by one that comes early (the emulated GPU keeps its own clock), so single gaps scatter both ways
        # while a window's mean only grows with a slow box
        window = [t for t in ts if t < t_send][-11:]
        steps.append((window[-1] - window[0]) / (len(window) - 1))
        gaps.append(max(b - a for a, b in zip(ts, ts[1:], strict=False) if b >= t_send and a <= t_first))
    step_ms = statistics.median(steps) * 1e3 / scale
    max_gap_ms = statistics.median(gaps) * 1e3 / scale  # median over streams: one stalled Python task is not the GPU
    kv = 8 * (256 + 20)
    want_step = roofline.decode_step_time_s(s.model, s.gpu, 8, kv) * 1e3
    want_stall = roofline.prefill_time_s(s.model, s.gpu, 2048, 16384) * 1e3
    return step_ms, max_gap_ms, want_step, want_stall


async def test_local_append_on_decode_stalls_the_running_decodes():
    # Wall-clock noise on a shared box (another process, a GC pause) only ever adds time, and it hits every stream of
    # this process at once: the smallest of three runs is the emulated GPU's timing.
    runs = [await measure_stall(seed) for seed in (11, 21, 31)]
    step_ms = min(r[0] for r in runs)
    max_gap_ms = min(r[1] for r in runs)
    _, _, want_step, want_stall = runs[0]
    assert step_ms == pytest.approx(want_step, rel=0.10)
    # the others wait for the whole append prefill, plus their own step
    assert max_gap_ms == pytest.approx(want_stall + want_step, rel=0.10)
    assert max_gap_ms > 10 * step_ms
