"""Routing: pick the servers for one request, ask the policy for the route, and learn from the outcome.

Server choice is mechanical (decode by prefix affinity = longest cached prefix, ties to the least loaded; prefill by
least load); the route choice (P or D) is the policy's. After a request the decode server's index gains the prompt and
the generated tokens (the server keeps both), the prefill server's index the prompt (P-route), and every policy with an
`observe` hook sees the measured timings.

Calibration never runs on the event loop, nor in its process: a policy with `observe_deferred` (auto) hands back its
due refit as a job, whose fit over a snapshot of its window runs in a worker process (a scipy fit in a thread held the
GIL for tens of ms and delayed the requests being served meanwhile); its result is installed back on the loop.
Observations are in GPU time: with emulated backends the router's wall-clock TTFT/TPOT/E2E are divided by the emulator's
time_scale, like the servers' own reported timings.

Admission: `reserve` takes a slot of the total in-flight limit before the request is tokenized (a flood is refused
before it costs CPU); `plan` takes the per-backend slots once the servers are chosen.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import multiprocessing
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ppd import roofline, specs
from ppd.calibration import RefitJob, warm_refit_worker
from ppd.config import StackConfig, resolve_path
from ppd.policies import Decision, Policy, PolicyContext, Route, RoutingInput, ServerLoad, make_policy, policy_names
from ppd.policies.base import Observation
from router.backends import Backend, BackendPool, Health
from router.errors import OpenAIError
from router.metrics import RouterMetrics

log = logging.getLogger(__name__)

CONVERSATION_MEMORY = 65536  # conversations whose last route and decode server are remembered (LRU)
PREFILL_FAILED_RETRY = "prefill-failed-retry"  # decision reason of a D-route retry after a failed P-route
NO_LOCAL_APPEND = "no-local-append"  # the policy said D, but the decode servers run stock SGLang (no extension)


def _after_dispatch(fn: Callable[..., None], *args: Any) -> None:
    """Run `fn(*args)` in the event loop's next turn: off the path to the first token of the request being planned,
    whose halves are written in the turn that plans them when kept-alive connections are at hand (router.pd.RouteCall.
    chunks; a new connection is opened from that turn). Without a running loop (a synchronous caller), now."""
    try:
        asyncio.get_running_loop().call_soon(fn, *args)
    except RuntimeError:
        fn(*args)


def usable_prefix(matched: int, prompt_tokens: int) -> int:
    """A server recomputes at least the last prompt token (it needs its logits): L <= prompt - 1."""
    return max(0, min(matched, prompt_tokens - 1))


def policy_context(cfg: StackConfig) -> PolicyContext:
    serving = cfg.decode or cfg.colocated
    return PolicyContext(
        model=cfg.model.spec,
        prefill_gpu=cfg.prefill[0].gpu if cfg.prefill else serving[0].gpu,
        decode_gpu=serving[0].gpu,
        link=cfg.link.kind,
        link_gbytes_per_s=cfg.link.gbytes_per_s,
        chunk_size=cfg.emulator.chunk_size if cfg.backend == "emulated" else cfg.sglang.chunked_prefill_size,
    )


@dataclass
class RoutePlan:
    """Where one request goes and why; the admission slots it holds are released by `Router.release`."""

    decision: Decision
    decode: Backend  # the server that answers (decode or colocated)
    prefill: Backend | None  # set on the P-route only
    prompt_ids: tuple[int, ...]
    decode_cached_tokens: int  # L on the answering server (router's index)
    prefill_cached_tokens: int
    decode_load: ServerLoad
    prefill_load: ServerLoad | None
    conversation: str | None = None
    retry_of: dict[str, Any] | None = None  # the failed first attempt this plan retries (route, server, error)
    released: bool = field(default=False, repr=False)
    prefill_released: bool = field(default=False, repr=False)

    @property
    def route(self) -> Route:
        return self.decision.route

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def append_tokens(self) -> int:
        return max(0, self.prompt_tokens - self.decode_cached_tokens)

    @property
    def backends(self) -> list[Backend]:
        return [self.decode] + ([self.prefill] if self.prefill is not None else [])


@dataclass(frozen=True)
class Retry:
    """A second plan for a request whose first attempt failed before any token reached the client."""

    failed_route: Route
    failed_server: str
    error: str
    exclude: frozenset[str]  # servers the retry must not use
    prefill_failed: bool = False  # the first attempt was a P-route whose prefill half failed
    decode_only: bool = False  # work may have started on the prefill server: only the D-route may serve the retry

    def summary(self) -> dict[str, Any]:
        return {"route": self.failed_route.value, "server": self.failed_server, "error": self.error}


@dataclass(frozen=True)
class Outcome:
    """What the router saw of a finished request."""

    output_ids: tuple[int, ...]
    ttft_ms: float
    tpot_ms: float | None
    e2e_ms: float
    backend_cached_tokens: int | None  # decode/colocated server's meta_info.cached_tokens
    prefill_reported_cached: int | None  # prefill server's meta_info.cached_tokens (P-route)
    kv_bytes: int
    server_timings: dict[str, float]


class Router:
    def __init__(self, cfg: StackConfig, pool: BackendPool, metrics: RouterMetrics):
        self.cfg = cfg
        self.pool = pool
        self.metrics = metrics
        self.context = policy_context(cfg)
        self._policies: dict[str, Policy] = {}
        self._calibration = self._load_calibration()
        self.default_policy = self.policy(cfg.router.policy)  # fail at start on an unknown configured policy
        self._conversations: OrderedDict[str, tuple[Route, str]] = OrderedDict()
        self.model_spec = specs.model(cfg.model.spec)
        # A real SGLang decode server without our extension runs a chunk cache: it keeps nothing between requests,
        # and cannot run a D-route (local append) at all.
        self.decode_keeps_kv = cfg.backend == "emulated" or cfg.sglang.decode_local_append
        self.d_route_possible = cfg.mode == "disaggregated" and self.decode_keeps_kv
        self.serves_without_prefill = self.d_route_possible and self._falls_back_to_decode(self.default_policy)
        self.admitting = 0  # requests holding a total slot while they are tokenized (see `reserve`)
        self._refits: dict[str, asyncio.Task] = {}  # policy name -> its calibration refit running off-loop
        self._next_refit: dict[str, RefitJob] = {}  # the newest refit due meanwhile
        # the calibration worker process: started with the router when the configured policy refits, else at the
        # first due refit
        self.refit_executor: concurrent.futures.Executor | None = None

    # --- policies ------------------------------------------------------------------------------------------------

    def policy(self, name: str | None) -> Policy:
        """The named policy, instantiated once; `router.policy_params` go to the configured policy only."""
        name = name or self.cfg.router.policy
        if name not in self._policies:
            params = self.cfg.router.policy_params if name == self.cfg.router.policy else {}
            try:
                policy = make_policy(name, context=self.context, **params)
            except KeyError:
                raise OpenAIError(
                    400,
                    f"unknown policy {name!r} in x-ppd-policy; known: {', '.join(policy_names())}",
                    param="x-ppd-policy",
                    code="unknown_policy",
                ) from None
            restore = getattr(policy, "restore_state", None)
            if restore is not None and self._calibration is not None and restore(self._calibration):
                log.info("policy %s: calibration restored from %s", name, self.cfg.router.calibration_path)
            self._policies[name] = policy
        return self._policies[name]

    def _load_calibration(self) -> dict | None:
        if not self.cfg.router.calibration_path:
            return None
        from ppd.calibration import load_state  # numpy/scipy: only when calibration is persisted

        return load_state(resolve_path(self.cfg.router.calibration_path))

    def save_calibration(self) -> bool:
        """Write the calibration of the configured policy (or the first that has one) to router.calibration_path."""
        if not self.cfg.router.calibration_path:
            return False
        from ppd.calibration import save_state

        ordered = [self.default_policy] + [p for p in self.policies if p is not self.default_policy]
        for policy in ordered:
            export = getattr(policy, "export_state", None)
            state = export() if export is not None else None
            if state:
                save_state(resolve_path(self.cfg.router.calibration_path), state)
                return True
        return False

    @property
    def policies(self) -> list[Policy]:
        return list(self._policies.values())

    def _falls_back_to_decode(self, policy: Policy) -> bool:
        """Whether `policy` serves by the D-route when no prefill server can run (asked once, at start)."""
        r = self.cfg.router
        probe = RoutingInput(
            prompt_tokens=2,
            decode_cached_tokens=0,
            prefill_cached_tokens=0,
            max_new_tokens=1,
            prefill=ServerLoad(url="", healthy=False, max_inflight=r.max_inflight_per_backend),
            decode=ServerLoad(url="probe", max_inflight=r.max_inflight_per_backend),
        )
        try:
            return policy.decide(probe).route is Route.DECODE
        except Exception:  # a policy that cannot decide without a prefill server needs one
            log.exception("policy %s: probing its fallback failed", policy.name)
            return False

    # --- readiness and admission ---------------------------------------------------------------------------------

    def ready(self) -> bool:
        """Whether the configured policy can serve a request now: a healthy answering server (decode or colocated)
        and, unless the policy falls back to the D-route, a healthy prefill server. False until every backend has
        been checked once."""
        pool = self.pool
        if not pool.checked:
            return False
        if not any(b.health is Health.HEALTHY for b in pool.serving):
            return False
        if self.cfg.mode == "colocated" or self.serves_without_prefill:
            return True
        return any(b.health is Health.HEALTHY for b in pool.prefill)

    def _check_total(self) -> None:
        if self.pool.total_inflight() + self.admitting >= self.cfg.router.max_inflight_total:
            self.metrics.rejected.labels("total_full").inc()
            raise OpenAIError(429, "the router is at its in-flight limit; retry later", type_="rate_limit_exceeded")

    def reserve(self) -> None:
        """Take a slot of the total in-flight limit before tokenizing (429 at the limit, 503 with no usable answering
        server); `unreserve` gives it back right before `plan`, which takes the real slots."""
        if not any(b.usable for b in self.pool.serving):
            raise OpenAIError(503, "no healthy decode server", type_="service_unavailable", code="no_healthy_backend")
        self._check_total()
        self.admitting += 1

    def unreserve(self) -> None:
        self.admitting -= 1

    # --- planning ------------------------------------------------------------------------------------------------

    def _pick_serving(self, prompt_ids: Sequence[int], previous: str | None, exclude: set[str]) -> tuple[Backend, int]:
        max_inflight = self.cfg.router.max_inflight_per_backend
        candidates = [b for b in self.pool.serving if b.usable and b.name not in exclude]
        if not candidates:
            raise OpenAIError(503, "no healthy decode server", type_="service_unavailable", code="no_healthy_backend")
        free = [b for b in candidates if b.inflight < max_inflight]
        if not free:
            self.metrics.rejected.labels("backend_full").inc()
            raise OpenAIError(
                429, "all decode servers are at their in-flight limit; retry later", type_="rate_limit_exceeded"
            )
        scored = [(b.index.match(prompt_ids, touch=False), b) for b in free]
        best = max(scored, key=lambda sb: (sb[0], sb[1].name == previous, tuple(-k for k in sb[1].load_key())))
        backend = best[1]
        return backend, usable_prefix(backend.index.match(prompt_ids, touch=True), len(prompt_ids))

    def _pick_prefill(self, exclude: set[str]) -> Backend | None:
        candidates = [b for b in self.pool.prefill if b.usable and b.name not in exclude]
        if not candidates:
            return None
        return min(candidates, key=lambda b: b.load_key())

    def plan(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        policy_name: str | None = None,
        conversation: str | None = None,
        retry: Retry | None = None,
    ) -> RoutePlan:
        """Choose servers and route, and take the admission slots (429/503 as OpenAIError when none). A `retry`
        avoids the servers its first attempt failed on; a decode-only retry is refused (503) when the policy will
        not take the D-route, and otherwise says so in its reason (PREFILL_FAILED_RETRY)."""
        exclude = set(retry.exclude) if retry is not None else set()
        if retry is not None and retry.decode_only:
            exclude.update(b.name for b in self.pool.prefill)
        r = self.cfg.router
        self._check_total()
        prev_route, prev_server = self._conversations.get(conversation, (None, None)) if conversation else (None, None)
        policy = self.policy(policy_name)
        prompt_ids = tuple(prompt_ids)
        decode, cached = self._pick_serving(prompt_ids, prev_server, exclude)
        decode_load = decode.load(r.max_inflight_per_backend)

        if self.cfg.mode == "colocated":
            decision = Decision(
                Route.COLOCATED,
                "colocated",
                "affinity" if cached else "least-loaded",
                cached / len(prompt_ids) if prompt_ids else 0.0,
            )
            prefill, prefill_load, prefill_cached = None, None, 0
        else:
            prefill = self._pick_prefill(exclude)
            prefill_load = (
                prefill.load(r.max_inflight_per_backend)
                if prefill is not None
                else ServerLoad(url="", healthy=False, max_inflight=r.max_inflight_per_backend)
            )
            prefill_cached = (
                usable_prefix(prefill.index.match(prompt_ids, touch=False), len(prompt_ids))
                if prefill is not None
                else 0
            )
            x = RoutingInput(
                prompt_tokens=len(prompt_ids),
                decode_cached_tokens=cached,
                prefill_cached_tokens=prefill_cached,
                max_new_tokens=max_new_tokens,
                prefill=prefill_load,
                decode=decode_load,
                previous_route=prev_route,
            )
            decision = policy.decide(x)
            if decision.route is Route.DECODE and not self.d_route_possible and prefill is not None and prefill.usable:
                # stock SGLang decode server (no ppd.sglang.ext): it cannot append locally, whatever the policy says
                decision = dataclasses.replace(decision, route=Route.PREFILL, reason=NO_LOCAL_APPEND)
            if retry is not None and retry.prefill_failed and decision.route is Route.DECODE:
                decision = dataclasses.replace(
                    decision,
                    reason=PREFILL_FAILED_RETRY,
                    detail=f"{retry.error}; then {decision.reason}"
                    + (f": {decision.detail}" if decision.detail else ""),
                )
            if decision.route is Route.PREFILL:
                if prefill is None or not prefill.usable:
                    raise OpenAIError(
                        503, "no healthy prefill server", type_="service_unavailable", code="no_healthy_backend"
                    )
                if prefill_load.saturated:
                    self.metrics.rejected.labels("backend_full").inc()
                    raise OpenAIError(
                        429, "prefill servers are at their in-flight limit; retry later", type_="rate_limit_exceeded"
                    )
                prefill.index.match(prompt_ids, touch=True)
            else:
                prefill = None  # prefill_load stays: observations record the queue the policy saw
        _after_dispatch(self._announce, decision, cached, len(prompt_ids) - cached)
        plan = RoutePlan(
            decision=decision,
            decode=decode,
            prefill=prefill,
            prompt_ids=prompt_ids,
            decode_cached_tokens=cached,
            prefill_cached_tokens=prefill_cached,
            decode_load=decode_load,
            prefill_load=prefill_load,
            conversation=conversation,
            retry_of=retry.summary() if retry is not None else None,
        )
        self._acquire(plan)
        return plan

    def _announce(self, decision: Decision, cached: int, append: int) -> None:
        """Count the decision and log it: the logging module formats and writes the line on the loop, the largest
        single step of planning when it ran before dispatch; done once the request has gone out."""
        self.metrics.decisions.labels(decision.policy, decision.route.value, decision.reason).inc()
        if self.cfg.router.log_decisions:
            log.info("decision %s L=%d m=%d", decision.explain(), cached, append)

    # --- admission slots -----------------------------------------------------------------------------------------

    def _acquire(self, plan: RoutePlan) -> None:
        for b in plan.backends:
            b.inflight += 1
            b.inflight_tokens += plan.prompt_tokens
            self.metrics.inflight.labels(b.name).set(b.inflight)
        plan.decode.index.lock(plan.prompt_ids[: plan.decode_cached_tokens])

    def release_prefill(self, plan: RoutePlan) -> None:
        """The prefill half is done (its KV left): its server's slot frees now, not when decoding ends. Otherwise
        every decoding P-route stream would count as queued work on the prefill server (a phantom queue in T_P)."""
        b = plan.prefill
        if b is None or plan.released or plan.prefill_released:
            return
        plan.prefill_released = True
        b.end_request(plan.prompt_tokens)
        self.metrics.inflight.labels(b.name).set(b.inflight)

    def release(self, plan: RoutePlan) -> None:
        if plan.released:
            return
        plan.released = True
        plan.decode.index.lock(plan.prompt_ids[: plan.decode_cached_tokens], delta=-1)
        for b in plan.backends:
            if b is plan.prefill and plan.prefill_released:
                continue
            b.end_request(plan.prompt_tokens)
            self.metrics.inflight.labels(b.name).set(b.inflight)

    # --- learning from outcomes ----------------------------------------------------------------------------------

    def kv_bytes_moved(self, plan: RoutePlan) -> int:
        """KV the P-route moves: the whole prompt's (SGLang sends every prompt token's KV)."""
        return roofline.kv_bytes(self.model_spec, plan.prompt_tokens) if plan.route is Route.PREFILL else 0

    def record_partial(self, plan: RoutePlan, output_ids: Sequence[int]) -> None:
        """A request that stopped after its first token (client gone, timeout): the server prefilled the prompt
        and decoded what it streamed, and keeps that KV as SGLang does for aborted requests."""
        if self.decode_keeps_kv or plan.route is Route.COLOCATED:
            plan.decode.index.insert(plan.prompt_ids + tuple(output_ids[:-1]))

    def record(self, plan: RoutePlan, outcome: Outcome) -> None:
        """A request finished with output: update indexes, conversation memory and policies."""
        decode = plan.decode
        reported = outcome.backend_cached_tokens
        if plan.route is not Route.PREFILL and reported is not None and reported < plan.decode_cached_tokens:
            # The server evicted part of what the index holds; free as much from the index's LRU end.
            self.metrics.index_corrections.labels(decode.name).inc()
            decode.index.evict(plan.decode_cached_tokens - reported)
        if self.decode_keeps_kv or plan.route is Route.COLOCATED:
            # The server holds KV for every token it has run through the model: the prompt and all outputs but
            # the last (SGLang's cache_finished_req keeps kv_committed_len tokens).
            decode.index.insert(plan.prompt_ids + tuple(outcome.output_ids[:-1]))
        if plan.prefill is not None:
            plan.prefill.index.insert(plan.prompt_ids)
        if plan.conversation:
            self._conversations[plan.conversation] = (plan.route, decode.name)
            self._conversations.move_to_end(plan.conversation)
            while len(self._conversations) > CONVERSATION_MEMORY:
                self._conversations.popitem(last=False)
        if plan.route is Route.COLOCATED:
            return
        # the policies model GPU time: an emulated GPU runs time_scale x slower (or faster) than the real one
        scale = self.time_scale(outcome.server_timings)
        obs = Observation(
            route=plan.route,
            prompt_tokens=plan.prompt_tokens,
            decode_cached_tokens=plan.decode_cached_tokens,
            prefill_cached_tokens=(
                outcome.prefill_reported_cached
                if outcome.prefill_reported_cached is not None
                else plan.prefill_cached_tokens
            ),
            completion_tokens=len(outcome.output_ids),
            ttft_ms=outcome.ttft_ms / scale,
            tpot_ms=outcome.tpot_ms / scale if outcome.tpot_ms is not None else None,
            e2e_ms=outcome.e2e_ms / scale,
            kv_bytes=outcome.kv_bytes,
            decode_running_reqs=plan.decode_load.running_reqs,
            decode_running_kv_tokens=plan.decode_load.running_kv_tokens,
            prefill_queued_reqs=plan.prefill_load.queued_reqs if plan.prefill_load is not None else 0,
            server_timings=outcome.server_timings,
        )
        for policy in self.policies:  # every policy learns from every route, forced ones included
            deferred = getattr(policy, "observe_deferred", None)
            observe = getattr(policy, "observe", None)
            try:
                if deferred is not None:
                    job = deferred(obs)
                    if job is not None:
                        self._refit_later(policy.name, job)
                elif observe is not None:
                    observe(obs)
            except Exception:  # a calibration bug must not fail a served request
                log.exception("policy %s observe failed", policy.name)

    def time_scale(self, server_timings: dict[str, float]) -> float:
        """Wall seconds per GPU second of the backends: the emulator's report (meta_info.ppd.time_scale), else the
        config's emulator.time_scale for emulated backends, else 1."""
        reported = server_timings.get("time_scale")
        if reported is not None and reported > 0:
            return float(reported)
        if self.cfg.backend == "emulated" and self.cfg.emulator.time_scale > 0:
            return float(self.cfg.emulator.time_scale)
        return 1.0

    # --- calibration off the event loop --------------------------------------------------------------------------

    def _refit_later(self, name: str, job: RefitJob) -> None:
        """Run a policy's refit job in the worker process; one at a time per policy, the newest due one next."""
        running = self._refits.get(name)
        if running is not None and not running.done():
            self._next_refit[name] = job  # snapshots are cumulative: only the newest matters
            return
        self._refits[name] = asyncio.get_running_loop().create_task(self._run_refits(name, job))

    def _executor(self) -> concurrent.futures.Executor:
        if self.refit_executor is None:
            self.refit_executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=warm_refit_worker
            )
        return self.refit_executor

    def start_refit_worker(self) -> None:
        """Start the calibration worker now if the configured policy refits (`auto`): its start-up (a Python process
        importing numpy and scipy) then falls at the router's start, not amid traffic at the first
        refit. Other policies start it at their first due refit, if a request ever names `auto`."""
        if getattr(self.default_policy, "observe_deferred", None) is not None:
            self._executor().submit(int)  # a trivial call: the pool starts its process on the first submit

    async def _run_refits(self, name: str, job: RefitJob | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            while job is not None:
                try:
                    outcome = await loop.run_in_executor(self._executor(), job.work)
                    job.install(outcome)  # back on the loop: decide() never sees a half-installed fit
                except Exception:  # a failed fit keeps the previous parameters
                    log.exception("policy %s: calibration refit failed", name)
                job = self._next_refit.pop(name, None)
        finally:
            self._refits.pop(name, None)

    async def drain_refits(self, timeout_s: float = 10.0) -> None:
        """Wait for refits in flight (before saving calibration at shutdown), then stop the worker process."""
        tasks = [t for t in self._refits.values() if not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        if self.refit_executor is not None:
            executor, self.refit_executor = self.refit_executor, None
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
