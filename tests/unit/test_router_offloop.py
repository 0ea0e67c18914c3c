"""Nothing long runs on the router's event loop: long inputs are tokenized in a worker thread and calibration refits
run in a worker process, while other requests are served. Shown without timing: the slow work is held in its thread on a
threading.Event, and other requests complete meanwhile. Also: calibration sees GPU time (wall / time_scale)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import pickle
import threading
from dataclasses import dataclass, field

import pytest
from router_fakes import D_URL, make_config, running_router

import ppd.calibration as calibration
import router.endpoints as router_endpoints
from ppd.calibration import Calibrator
from ppd.costmodel import CostParams
from ppd.policies import Decision, Route, register
from ppd.policies.base import Observation, PolicyContext
from ppd.tokenizer import ChatTokenizer

MODEL = "llama-3-8b"


def chat(content: str, max_tokens: int = 4, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **kw}


async def until(flag: threading.Event, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.005)):
        if flag.is_set():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("never happened")


@pytest.mark.parametrize("stream", [False, True])
async def test_long_tokenization_runs_off_the_loop(stream):
    cfg, cluster = make_config("decode", context_length=32768)
    async with running_router(cfg, cluster) as (app, client):
        tok = app.state.ppd.tokenizer
        encode_chat = tok.encode_chat
        entered, release = threading.Event(), threading.Event()
        threads: list[int] = []

        def held(messages, *args, **kw):
            if len(messages[0]["content"]) > router_endpoints.TOKENIZE_INLINE_MAX_CHARS:
                threads.append(threading.get_ident())
                entered.set()
                assert release.wait(10)
            return encode_chat(messages, *args, **kw)

        tok.encode_chat = held
        long_text = "lorem ipsum " * 3000  # 36k characters: over the inline limit
        long = asyncio.create_task(client.post("/v1/chat/completions", json=chat(long_text, stream=stream)))
        await until(entered)
        # the long request is mid-tokenization; the loop still serves others, start to finish
        for i in range(3):
            r = await client.post("/v1/chat/completions", json=chat(f"short {i}", stream=stream))
            assert r.status_code == 200, r.text
        assert not long.done()
        release.set()
        r = await long
        assert r.status_code == 200, r.text
        assert threads and threads[0] != threading.get_ident()  # a worker thread, not the loop's
        (body,) = [b for b in cluster.generate_bodies(D_URL) if len(b["input_ids"]) > 1000]
        assert body["input_ids"] == ChatTokenizer.load().encode_chat([{"role": "user", "content": long_text}])


async def test_long_completion_prompt_tokenized_off_the_loop():
    cfg, cluster = make_config("decode", context_length=32768)
    async with running_router(cfg, cluster) as (app, client):
        tok = app.state.ppd.tokenizer
        encode = tok.encode
        threads: list[int] = []

        def spy(text):
            threads.append(threading.get_ident())
            return encode(text)

        tok.encode = spy
        short = await client.post("/v1/completions", json={"model": MODEL, "prompt": "short", "max_tokens": 2})
        long = await client.post("/v1/completions", json={"model": MODEL, "prompt": "w " * 6000, "max_tokens": 2})
        assert short.status_code == long.status_code == 200
        assert threads[0] == threading.get_ident() != threads[1]  # short inline, long in a worker


async def test_calibration_refits_run_off_the_loop_and_coalesce(monkeypatch):
    entered, release = threading.Event(), threading.Event()
    fits: list[tuple[int, int]] = []  # (thread, observations in the snapshot)
    real_fit = calibration.fit

    def held_fit(feats, prior, **kw):
        fits.append((threading.get_ident(), len(feats)))
        entered.set()
        assert release.wait(10)
        return real_fit(feats, prior, **kw)

    monkeypatch.setattr(calibration, "fit", held_fit)
    cfg, cluster = make_config("auto", policy_params={"refit_every": 1, "min_route_obs": 1})
    async with running_router(cfg, cluster) as (app, client):
        # a thread instead of the worker process, so the fit can be held here (the process is tested below)
        app.state.ppd.router.refit_executor.shutdown()
        app.state.ppd.router.refit_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        policy = app.state.ppd.router.default_policy
        headers = {"x-ppd-policy": "decode"}  # a forced route: `auto` learns from it all the same
        r = await client.post("/v1/chat/completions", json=chat("first"), headers=headers)
        assert r.status_code == 200
        await until(entered)  # the first refit is running, held in its thread
        before = policy.params
        for i in range(3):  # served while it runs; each makes another refit due
            r = await client.post("/v1/chat/completions", json=chat(f"next {i}"), headers=headers)
            assert r.status_code == 200
        assert policy.calibrator.seen == 4 and policy.calibrator.last is None and policy.params is before
        release.set()
        for _ in range(2000):
            if len(fits) == 2 and not app.state.ppd.router._refits:
                break
            await asyncio.sleep(0.005)
    # one refit at a time: the three that came due meanwhile ran as one, over the newest window
    assert [n for _, n in fits] == [1, 4]
    assert all(t != threading.get_ident() for t, _ in fits)
    assert policy.calibrator.last is not None and policy.calibrator.last.n_obs == 4


async def test_calibration_refits_run_in_a_worker_process():
    cfg, cluster = make_config("auto", policy_params={"refit_every": 2, "min_route_obs": 1})
    async with running_router(cfg, cluster) as (app, client):
        router = app.state.ppd.router
        assert router.refit_executor is not None  # started with the app: the configured policy refits
        for i in range(4):
            r = await client.post("/v1/chat/completions", json=chat(f"turn {i}"), headers={"x-ppd-policy": "decode"})
            assert r.status_code == 200
        for _ in range(3000):
            if router.default_policy.calibrator.last is not None and not router._refits:
                break
            await asyncio.sleep(0.005)
        assert router.default_policy.calibrator.last.n_obs in (2, 4)
        (worker,) = router.refit_executor._processes.values()
        assert worker.pid != os.getpid() and worker.is_alive()
    assert router.refit_executor is None and not worker.is_alive()  # stopped with the app


def test_a_refit_begun_before_restore_is_not_installed():
    cal = Calibrator(CostParams.from_context(PolicyContext()), refit_every=1000, min_route_obs=1)
    obs = Observation(Route.DECODE, 1000, 0, 0, 4, ttft_ms=50.0, tpot_ms=5.0, e2e_ms=70.0, kv_bytes=0,
                      decode_running_reqs=0, decode_running_kv_tokens=0, prefill_queued_reqs=0)  # fmt: skip
    assert cal.add(obs) is False
    job = cal.refit_job()
    outcome = pickle.loads(pickle.dumps(job.work))()  # the fit, as the router's worker process runs it
    assert cal.last is None  # nothing changes before install
    cal.restore(cal.state({"k": 1}), {"k": 1})
    result = job.install(outcome)
    assert result.n_obs == 1 and cal.last is None  # made against the old prior: dropped
    cal.refit()
    assert cal.last is not None


@dataclass
class Observer:
    name: str = "observer"
    observed: list[Observation] = field(default_factory=list)

    def score(self, x):
        return ()

    def decide(self, x) -> Decision:
        return Decision(Route.DECODE, self.name, "test", x.cache_rate)

    def observe(self, obs: Observation) -> None:
        self.observed.append(obs)


register("observer", lambda context=None, **_: Observer())


@pytest.mark.parametrize("reported", [None, 2.0])
async def test_observations_are_in_emulated_gpu_time(reported):
    """The emulator runs time_scale x slower than the GPU it emulates and reports its own timings divided by it;
    the router's measured TTFT/TPOT/E2E go to the policies divided the same way (by the reported time_scale, else
    the config's)."""
    cfg, cluster = make_config("observer", emulator={"time_scale": 4.0})
    cluster[D_URL].token_delay_s = 0.01
    if reported is not None:
        cluster[D_URL].meta_ppd = {"time_scale": reported, "prefill_ms": 1.0}
    scale = reported or 4.0
    async with running_router(cfg, cluster) as (app, client):
        r = await client.post("/v1/chat/completions", json=chat("scale me", 5))
        assert r.status_code == 200
        ppd = r.json()["ppd"]
        (obs,) = app.state.ppd.router.default_policy.observed
    assert obs.ttft_ms == pytest.approx(ppd["ttft_ms"] / scale, abs=1e-3)
    assert obs.e2e_ms == pytest.approx(ppd["e2e_ms"] / scale, abs=1e-3)
    # 4 gaps of at least 10 ms between 5 tokens, all between the first token and the end
    assert 10.0 <= obs.tpot_ms * scale <= (ppd["e2e_ms"] - ppd["ttft_ms"]) / 4 + 1e-2
    # what the client sees stays wall-clock
    assert ppd["e2e_ms"] >= 4 * 10 - 1


async def test_real_sglang_observations_are_wall_clock():
    cfg, cluster = make_config("observer", emulator={"time_scale": 4.0})
    cfg = dataclasses.replace(cfg, backend="sglang", sglang=dataclasses.replace(cfg.sglang, decode_local_append=True))
    async with running_router(cfg, cluster) as (app, client):
        r = await client.post("/v1/chat/completions", json=chat("wall", 3))
        (obs,) = app.state.ppd.router.default_policy.observed
    assert obs.ttft_ms == pytest.approx(r.json()["ppd"]["ttft_ms"], abs=1e-3)
