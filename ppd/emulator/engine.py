"""The emulated GPU of one server: a single asyncio task doing SGLang-style continuous batching on roofline time.

Each iteration is one of (in this priority, like SGLang's non-mixed scheduler):
- landing: PD decode requests whose KV arrived join the running batch and stream their first token (the prefill's),
  then the GPU stalls for the KV landing (roofline.kv_landing_time_s);
- extend: one prefill chunk of up to `chunk_size` new tokens over the waiting requests, FIFO (prefill of a normal
  request, of a PD prefill request, or a local append on the decode server); a request's cached prefix comes from this
  server's radix cache;
- decode: one step advancing every running request by one token.
The iteration sleeps its roofline time x time_scale against a monotonic deadline: while the GPU stays busy, the next
iteration starts at the previous deadline rather than when the Python loop got round to it, so loop overhead does not
accumulate. Requests reserve prompt + max_new_tokens of KV while active; the radix cache (prompt + output of finished
requests on decode/colocated servers, prompts on prefill servers) gets what is left, evicting LRU leaves.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ppd import roofline
from ppd.prefix_index import PrefixIndex
from ppd.specs import GpuSpec, KernelEfficiency, ModelSpec

log = logging.getLogger(__name__)

JobKind = Literal["colocated", "local", "prefill", "pd_decode"]
MAX_LAG_S = 0.05  # further behind than this (a CPU stall), restart the deadline clock from now


@dataclass(frozen=True)
class EngineSpec:
    model: ModelSpec
    gpu: GpuSpec
    eff: KernelEfficiency
    time_scale: float
    chunk_size: int
    max_running_requests: int
    capacity_tokens: int
    role: Literal["prefill", "decode", "colocated"]


@dataclass(eq=False)
class Job:
    """One request inside the engine. Times are loop-clock seconds (monotonic)."""

    rid: str
    kind: JobKind
    prompt: tuple[int, ...]
    max_new_tokens: int
    stop_token_ids: frozenset[int]
    min_new_tokens: int
    arrival: float
    planned: np.ndarray | None = None  # every output token this request will produce (from the KV it holds)
    output_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    prefilled: int = 0  # prompt tokens with KV on this GPU (cached + computed)
    started: bool = False
    reserved: int = 0
    finish_reason: dict | None = None
    kv_landing_tokens: int = 0
    t_ready: float | None = None  # queued for the GPU
    t_prefill_start: float | None = None
    t_prefill_end: float | None = None
    t_first_token: float | None = None
    t_finish: float | None = None
    version: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    prefill_done: asyncio.Event = field(default_factory=asyncio.Event)
    quiet: bool = False  # PD prefill: no stream chunk until the transfer is done
    salt: int = 0  # sampling salt (0 = greedy)
    transfer_s: float | None = None  # PD: wall seconds the KV move took (modeled, >= measured)
    wire_bytes: int = 0  # PD: bytes moved over Mooncake
    aux: Any = None  # PD decode: the prefill's aux data
    # Wall clock (time.time()), for measuring what lies outside the server (a router's path): the request handed to
    # /generate, and its first stream chunk with a token handed to the HTTP server. The loop clock above may be
    # uvloop's, which counts milliseconds.
    arrival_unix: float | None = None
    first_chunk_unix: float | None = None
    integrity_ok: bool = True  # PD decode: received KV matched the sender's checksum
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def context_tokens(self) -> int:
        return self.prefilled + len(self.output_ids)

    def notify(self) -> None:
        self.version += 1
        self.changed.set()


def finish_length(n: int) -> dict:
    return {"type": "length", "length": n}


def finish_abort(message: str, status_code: int | None = None) -> dict:
    return {"type": "abort", "message": message, "status_code": status_code, "err_type": None}


class CapacityError(ValueError):
    pass


class Engine:
    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.cache = PrefixIndex(spec.capacity_tokens)
        self.jobs: dict[str, Job] = {}
        self.waiting: collections.deque[Job] = collections.deque()
        self.landed: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []
        self.reserved_tokens = 0
        self.awaiting_kv = 0  # PD decode requests admitted, KV not yet landed
        self.awaiting_memory = 0
        self._wake = asyncio.Event()
        self._capacity = asyncio.Condition()
        self._task: asyncio.Task | None = None
        self._gen_window: collections.deque[tuple[float, int]] = collections.deque()
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.on_finish = None  # callback(job) for metrics
        self.iterations = collections.Counter()

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="emulated-gpu")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    # ---- admission -------------------------------------------------------------------------------------------------
    def need_tokens(self, prompt_tokens: int, max_new_tokens: int) -> int:
        return prompt_tokens + (0 if self.spec.role == "prefill" else max_new_tokens)

    async def reserve(self, job: Job) -> None:
        """Hold KV for the job's whole life (SGLang pre-allocates); waits while memory is held by running requests."""
        need = self.need_tokens(len(job.prompt), job.max_new_tokens)
        if need > self.spec.capacity_tokens:
            raise CapacityError(
                f"The request needs {need} KV tokens, more than this server's KV pool ({self.spec.capacity_tokens})."
            )
        self.jobs[job.rid] = job
        async with self._capacity:
            self.awaiting_memory += 1
            try:
                await self._capacity.wait_for(
                    lambda: job.finished or self.reserved_tokens + need <= self.spec.capacity_tokens
                )
            finally:
                self.awaiting_memory -= 1
            if job.finished:
                return
            job.reserved = need
            self.reserved_tokens += need
            self._fit_cache()

    def _fit_cache(self) -> None:
        room = max(1, self.spec.capacity_tokens - self.reserved_tokens)
        self.cache.capacity_tokens = room
        if len(self.cache) > room:
            self.cache.evict(len(self.cache) - room)

    def _release(self, job: Job) -> None:
        if job.reserved:
            self.reserved_tokens -= job.reserved
            job.reserved = 0
            self._fit_cache()

    def enqueue_prefill(self, job: Job) -> None:
        job.t_ready = self._now()
        self.jobs[job.rid] = job
        self.waiting.append(job)
        self._wake.set()

    def enqueue_landed(self, job: Job, landing_tokens: int) -> None:
        job.t_ready = self._now()
        job.kv_landing_tokens = landing_tokens
        job.prefilled = len(job.prompt)  # the KV is on this GPU now
        self.jobs[job.rid] = job
        self.landed.append(job)
        self._wake.set()

    # ---- ending requests -------------------------------------------------------------------------------------------
    def finish(self, job: Job, reason: dict) -> None:
        """End a request (done, aborted or failed): free its memory, cache its KV, wake its stream."""
        if job.finished:
            return
        job.finish_reason = reason
        job.t_finish = self._now()
        if job in self.running:
            self.running.remove(job)
        try:
            self.waiting.remove(job)
        except ValueError:
            pass
        try:
            self.landed.remove(job)
        except ValueError:
            pass
        if self.spec.role != "prefill" and job.prefilled == len(job.prompt):
            # an aborted request whose KV is in place is cached too: SGLang finishes it like any other
            # (process_batch_result_decode -> release_kv_cache, is_insert=True), keeping the KV it computed (the
            # prompt and every output token but the last, kv_committed_len)
            done = job.output_ids if reason["type"] != "abort" else job.output_ids[:-1]
            self.cache.insert(job.prompt + tuple(done))
        self._release(job)
        self.jobs.pop(job.rid, None)
        job.prefill_done.set()
        job.done.set()
        job.quiet = False
        job.notify()
        self._wake_capacity()  # memory freed; a request aborted while waiting for memory stops waiting
        if self.on_finish is not None:
            self.on_finish(job)

    def release_transferred(self, job: Job) -> None:
        """PD prefill: the KV left this GPU; the request's memory is free (its prompt stays in the radix cache)."""
        self._release(job)
        self._wake_capacity()

    def abort(self, rid: str, message: str = "Abort request", status_code: int | None = None) -> bool:
        job = self.jobs.get(rid)
        if job is None or job.finished:
            return False
        self.finish(job, finish_abort(message, status_code))
        return True

    def abort_all(self) -> int:
        n = 0
        for rid in list(self.jobs):
            n += self.abort(rid)
        return n

    def _wake_capacity(self) -> None:
        async def notify() -> None:
            async with self._capacity:
                self._capacity.notify_all()

        asyncio.get_running_loop().create_task(notify())

    def flush_cache(self) -> bool:
        """SGLang flushes only when idle."""
        if self.jobs or self.running or self.waiting or self.landed:
            return False
        self.cache.clear()
        return True

    # ---- stats -----------------------------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_queued(self) -> int:
        return len(self.waiting) + len(self.landed)

    @property
    def used_tokens(self) -> int:
        active = [*self.running, *self.waiting, *self.landed]
        return sum(j.context_tokens for j in active)

    @property
    def decode_sum_seq_lens(self) -> int:
        return sum(j.context_tokens for j in self.running)

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens_total / self.prompt_tokens_total if self.prompt_tokens_total else 0.0

    def gen_throughput(self) -> float:
        now = time.monotonic()
        while self._gen_window and now - self._gen_window[0][0] > 5.0:
            self._gen_window.popleft()
        if not self._gen_window:
            return 0.0
        span = max(now - self._gen_window[0][0], 1e-3)
        return sum(n for _, n in self._gen_window) / span

    # ---- the GPU loop ----------------------------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self.landed or self.running or self._startable())

    def _startable(self) -> bool:
        if not self.waiting:
            return False
        head = self.waiting[0]
        return head.started or len(self.running) < self.spec.max_running_requests

    async def _loop(self) -> None:
        deadline: float | None = None
        while True:
            if not self._has_work():
                self._wake.clear()
                await self._wake.wait()
                deadline = None
            now = self._now()
            start = deadline if deadline is not None and now - deadline < MAX_LAG_S else now
            try:
                deadline = await self._iterate(start)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one iteration must not kill the server: fail the requests involved
                log.exception("emulated GPU iteration failed")
                for job in [*self.running, *self.waiting, *self.landed]:
                    self.finish(job, finish_abort("internal error in the emulated GPU", 500))
                deadline = None

    async def _sleep_until(self, t: float) -> None:
        delay = t - self._now()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _iterate(self, start: float) -> float:
        s = self.spec
        if self.landed:
            jobs = list(self.landed)
            self.landed.clear()
            tokens = 0
            for job in jobs:
                if job.finished:
                    continue
                job.t_first_token = start
                job.output_ids = [int(job.planned[0])]
                self._count_generated(1)
                tokens += job.kv_landing_tokens
                if not self._check_finish(job):
                    self.running.append(job)
                job.notify()
            self.iterations["landing"] += 1
            end = start + roofline.kv_landing_time_s(s.model, s.gpu, tokens, s.eff) * s.time_scale
            await self._sleep_until(end)
            return end

        batch = self._form_extend_batch(start)
        if batch:
            items = [(n, prefix) for _, n, prefix in batch]
            cost = roofline.extend_batch_breakdown(s.model, s.gpu, items, s.eff).total_s
            end = start + cost * s.time_scale
            self.iterations["extend"] += 1
            await self._sleep_until(end)
            for job, n, _ in batch:
                if job.finished:
                    continue
                job.prefilled += n
                if job.prefilled >= len(job.prompt):
                    self._prefill_complete(job, end)
            return end

        if self.running:
            batch_kv = sum(j.context_tokens for j in self.running)
            cost = roofline.decode_step_time_s(s.model, s.gpu, len(self.running), batch_kv, s.eff)
            end = start + cost * s.time_scale
            self.iterations["decode"] += 1
            await self._sleep_until(end)
            stepped = 0
            for job in list(self.running):
                if job.finished:
                    continue
                job.output_ids.append(int(job.planned[len(job.output_ids)]))
                stepped += 1
                self._check_finish(job)
                job.notify()
            self._count_generated(stepped)
            return end
        return start

    def _form_extend_batch(self, start: float) -> list[tuple[Job, int, int]]:
        """Up to chunk_size new tokens from the waiting queue, FIFO; a request that does not fit is chunked."""
        budget = self.spec.chunk_size if self.spec.chunk_size > 0 else 1 << 62
        batch: list[tuple[Job, int, int]] = []
        active = len(self.running)
        for job in list(self.waiting):
            if job.finished:
                continue
            if not job.started:
                if active >= self.spec.max_running_requests:
                    break
                matched = self.cache.match(job.prompt)
                job.cached_tokens = min(matched, len(job.prompt) - 1)  # the last token is always computed
                job.prefilled = job.cached_tokens
                job.started = True
                job.t_prefill_start = start
                self.prompt_tokens_total += len(job.prompt)
                self.cached_tokens_total += job.cached_tokens
            active += 1
            n = min(len(job.prompt) - job.prefilled, budget)
            batch.append((job, n, job.prefilled))
            budget -= n
            if budget <= 0:
                break
        return batch

    def _prefill_complete(self, job: Job, end: float) -> None:
        self.waiting.remove(job)
        job.t_prefill_end = end
        job.prefill_done.set()
        if job.kind == "prefill":
            job.output_ids = [int(job.planned[0])]
            job.t_first_token = end
        elif job.max_new_tokens <= 0:
            self.finish(job, finish_length(0))
        else:
            job.output_ids = [int(job.planned[0])]
            job.t_first_token = end
            self._count_generated(1)
            if not self._check_finish(job):
                self.running.append(job)
            job.notify()
        # SGLang caches the prompt as soon as it is computed (after the first token went out: host work)
        self.cache.insert(job.prompt)

    def _check_finish(self, job: Job) -> bool:
        n = len(job.output_ids)
        last = job.output_ids[-1]
        if last in job.stop_token_ids and n >= job.min_new_tokens:
            self.finish(job, {"type": "stop", "matched": last})
            return True
        if n >= job.max_new_tokens:
            self.finish(job, finish_length(n))
            return True
        return False

    def _count_generated(self, n: int) -> None:
        if n:
            self._gen_window.append((time.monotonic(), n))
