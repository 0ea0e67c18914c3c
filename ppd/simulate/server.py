"""One simulated GPU server: SGLang-style continuous batching timed by ppd.roofline, as the emulator does it.

The GPU runs one iteration at a time, chosen at every iteration boundary in this priority (ppd/emulator/engine.py):
1. landing: P-route requests whose KV arrived join the running batch and stream their first token (computed by the
   prefill server); the GPU then stalls while the KV lands (roofline.kv_landing_time_s);
2. extend: one prefill forward over the waiting requests, FIFO, up to `chunk_size` new tokens, the last one possibly
   cut (chunked prefill), timed by roofline.extend_batch_breakdown; a request whose last chunk ran emits its first
   token and joins the running batch (decode / colocated) or is handed back for its KV move (prefill servers);
   a request that has not started waits while `max_running_requests` are running;
3. decode: one step advances every running request by one token (roofline.decode_step_time_s).
Decode steps are simulated in bursts up to the next finishing request, cut short at the next step boundary when new
work arrives, so a long answer costs a few events instead of one per token; the times are those of step-by-step.

Batch KV of a decode step = sum over running requests of (prompt + tokens generated so far).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

import simpy

from ppd.policies import ServerLoad
from ppd.roofline import DEFAULT_EFFICIENCY, decode_step_time_s, extend_batch_breakdown, kv_landing_time_s
from ppd.simulate.kvcache import KvPool
from ppd.simulate.request import SimRequest
from ppd.specs import GpuSpec, KernelEfficiency, ModelSpec


@dataclass(eq=False)
class PrefillJob:
    req: SimRequest
    remaining: int  # tokens still to compute
    prefix: int  # tokens already in KV (cached + computed chunks)
    done: simpy.Event
    started: bool = False


@dataclass
class ServerStats:
    prefill_busy_s: float = 0.0
    decode_busy_s: float = 0.0
    landing_busy_s: float = 0.0
    prefill_forwards: int = 0
    prefill_tokens: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0
    max_batch: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class _StepPlan:
    """Cumulative end times of the next k decode steps with a fixed batch (affine in KV: closed form)."""

    def __init__(self, model: ModelSpec, gpu: GpuSpec, eff: KernelEfficiency, batch: int, kv0: int, k: int):
        f = decode_step_time_s
        self.k = k
        t0 = f(model, gpu, batch, kv0, eff)
        tk = f(model, gpu, batch, kv0 + (k - 1) * batch, eff)
        mid = (k - 1) // 2
        tm = f(model, gpu, batch, kv0 + mid * batch, eff)
        d = (tk - t0) / (k - 1) if k > 1 else 0.0
        # the step time is max(memory, compute) + overhead: affine in KV unless the max switches inside the burst
        self._affine = abs((t0 + d * mid) - tm) <= 1e-12 * max(1.0, tm)
        if self._affine:
            self._t0, self._d = t0, d
            self._cum: list[float] | None = None
        else:
            cum, t = [], 0.0
            for i in range(k):
                t += f(model, gpu, batch, kv0 + i * batch, eff)
                cum.append(t)
            self._cum = cum

    def end(self, n: int) -> float:
        """Time from the burst's start until n steps are done (0 <= n <= k)."""
        if n <= 0:
            return 0.0
        if self._cum is not None:
            return self._cum[n - 1]
        return n * self._t0 + self._d * n * (n - 1) / 2

    def steps_to_finish(self, elapsed: float) -> int:
        """Steps completed once the step running at `elapsed` ends (a step never stops half-way)."""
        if elapsed <= 0:
            return 0
        if self._cum is not None:
            return min(self.k, bisect.bisect_left(self._cum, elapsed) + 1)
        lo, hi = 0, self.k  # smallest n with end(n) >= elapsed
        while lo < hi:
            mid = (lo + hi) // 2
            if self.end(mid) >= elapsed:
                hi = mid
            else:
                lo = mid + 1
        return lo


class SimServer:
    def __init__(
        self,
        env: simpy.Environment,
        name: str,
        role: str,  # prefill | decode | colocated
        model: ModelSpec,
        gpu: GpuSpec,
        kv_capacity_tokens: int,
        chunk_size: int = 8192,
        max_running_requests: int = 256,
        max_inflight: int = 256,
        eff: KernelEfficiency = DEFAULT_EFFICIENCY,
    ):
        self.env, self.name, self.role = env, name, role
        self.model, self.gpu, self.eff = model, gpu, eff
        self.chunk_size = chunk_size
        self.max_running = max_running_requests
        self.max_inflight = max_inflight
        self.pool = KvPool(env, kv_capacity_tokens)
        self.prefill_q: deque[PrefillJob] = deque()
        self.join_q: deque[SimRequest] = deque()
        self._running: list[tuple[int, int, SimRequest]] = []  # (step at which it finishes, seq, req)
        self._seq = itertools.count()
        self.steps = 0  # decode steps run so far
        self.running_kv_tokens = 0
        self.queued_prefill_tokens = 0
        self.inflight = 0  # routed here, not finished (the router's own counter)
        self.stats = ServerStats()
        self._wake = env.event()
        env.process(self._loop())

    # --- what the cluster calls ---

    def submit_prefill(self, req: SimRequest, new_tokens: int, cached_tokens: int) -> simpy.Event:
        """Queue the prefill of `new_tokens` on top of `cached_tokens`; the event fires after its last chunk."""
        job = PrefillJob(req, new_tokens, cached_tokens, self.env.event())
        self.prefill_q.append(job)
        self.queued_prefill_tokens += new_tokens
        self._notify()
        return job.done

    def submit_join(self, req: SimRequest) -> None:
        """A request whose KV has arrived: it lands and joins the running batch at the next iteration boundary."""
        self.join_q.append(req)
        self._notify()

    @property
    def n_running(self) -> int:
        return len(self._running)

    def load(self) -> ServerLoad:
        return ServerLoad(
            url=self.name,
            gpu=self.gpu.name,
            running_reqs=self.n_running,
            queued_reqs=len(self.prefill_q) + len(self.join_q) + self.pool.waiting,
            inflight=self.inflight,
            running_kv_tokens=self.running_kv_tokens,
            token_usage=self.pool.used_tokens / self.pool.capacity_tokens if self.pool.capacity_tokens else 0.0,
            max_inflight=self.max_inflight,
        )

    # --- the GPU loop ---

    def _notify(self) -> None:
        if not self._wake.triggered:
            self._wake.succeed()

    def _loop(self):
        env = self.env
        while True:
            if self._wake.triggered:
                self._wake = env.event()
            if self.join_q:
                yield from self._land()
                continue
            batch = self._pack_prefill()
            if batch:
                yield from self._prefill_forward(batch)
            elif self._running:
                yield from self._decode_burst()
            else:
                yield self._wake

    def _land(self):
        tokens = 0
        while self.join_q:
            req = self.join_q.popleft()
            tokens += req.prompt_tokens
            self._start_decoding(req)
        dt = kv_landing_time_s(self.model, self.gpu, tokens, self.eff)
        yield self.env.timeout(dt)
        self.stats.landing_busy_s += dt

    def _start_decoding(self, req: SimRequest) -> None:
        """The first token is out; the rest come from decode steps."""
        now = self.env.now
        req.first_token_s = now
        if req.output_tokens <= 1:
            self._finish(req)
            return
        heapq.heappush(self._running, (self.steps + req.output_tokens - 1, next(self._seq), req))
        self.running_kv_tokens += req.prompt_tokens + 1
        self.stats.max_batch = max(self.stats.max_batch, len(self._running))

    def _finish(self, req: SimRequest) -> None:
        req.last_token_s = self.env.now
        req.finished.succeed()

    def _pack_prefill(self) -> list[tuple[PrefillJob, int]]:
        """Jobs (and how many of their tokens) for the next extend forward, in queue order."""
        budget = self.chunk_size if self.chunk_size > 0 else 1 << 62
        active = len(self._running)
        batch = []
        for job in self.prefill_q:
            if not job.started and active >= self.max_running:
                break  # no room in the running batch for another request (SGLang's max_running_requests)
            active += 1
            n = min(job.remaining, budget)
            batch.append((job, n))
            budget -= n
            if budget <= 0:
                break
        return batch

    def _prefill_forward(self, batch: list[tuple[PrefillJob, int]]):
        now = self.env.now
        for job, _ in batch:
            if not job.started:
                job.started = True
                job.req.prefill_start_s = now
        dt = extend_batch_breakdown(self.model, self.gpu, [(n, job.prefix) for job, n in batch], self.eff).total_s
        yield self.env.timeout(dt)
        self.stats.prefill_busy_s += dt
        self.stats.prefill_forwards += 1
        for job, n in batch:
            job.prefix += n
            job.remaining -= n
            self.queued_prefill_tokens -= n
            self.stats.prefill_tokens += n
        done = [job for job, _ in batch if job.remaining <= 0]
        for job in done:
            self.prefill_q.remove(job)
            job.req.prefill_end_s = self.env.now
            if self.role != "prefill":
                self._start_decoding(job.req)
            job.done.succeed()

    def _decode_burst(self):
        env = self.env
        batch = len(self._running)
        k = self._running[0][0] - self.steps  # steps until the next request finishes
        plan = _StepPlan(self.model, self.gpu, self.eff, batch, self.running_kv_tokens, k)
        start = env.now
        all_done = env.timeout(plan.end(k))
        yield env.any_of([all_done, self._wake])
        if all_done.processed:
            n = k
        else:  # new work: stop at the end of the step under way
            n = plan.steps_to_finish(env.now - start)
            if start + plan.end(n) > env.now:
                yield env.timeout(start + plan.end(n) - env.now)
        self.steps += n
        self.running_kv_tokens += n * batch
        self.stats.decode_busy_s += plan.end(n)
        self.stats.decode_steps += n
        self.stats.decode_tokens += n * batch
        while self._running and self._running[0][0] <= self.steps:
            _, _, req = heapq.heappop(self._running)
            self.running_kv_tokens -= req.prompt_tokens + req.output_tokens
            self._finish(req)
