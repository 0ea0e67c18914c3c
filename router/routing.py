"""Routing: pick the servers for one request, ask the policy for the route, and learn from the outcome.

Server choice is mechanical (decode by prefix affinity = longest cached prefix, ties to the least loaded; prefill by
least load); the route choice (P or D) is the policy's. After a request the decode server's index gains the prompt and
the generated tokens (the server keeps both), the prefill server's index the prompt (P-route), and every policy with an
`observe` hook sees the measured timings.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from ppd import roofline, specs
from ppd.config import StackConfig, resolve_path
from ppd.policies import Decision, Policy, PolicyContext, Route, RoutingInput, ServerLoad, make_policy, policy_names
from ppd.policies.base import Observation
from router.backends import Backend, BackendPool
from router.errors import OpenAIError
from router.metrics import RouterMetrics

log = logging.getLogger(__name__)

CONVERSATION_MEMORY = 65536  # conversations whose last route and decode server are remembered (LRU)


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
    released: bool = field(default=False, repr=False)

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
        # A real SGLang decode server without our extension runs a chunk cache: it keeps nothing between requests.
        self.decode_keeps_kv = cfg.backend == "emulated" or cfg.sglang.decode_local_append

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
        exclude: set[str] | None = None,
    ) -> RoutePlan:
        """Choose servers and route, and take the admission slots (429/503 as OpenAIError when none)."""
        exclude = exclude or set()
        r = self.cfg.router
        if self.pool.total_inflight() >= r.max_inflight_total:
            self.metrics.rejected.labels("total_full").inc()
            raise OpenAIError(429, "the router is at its in-flight limit; retry later", type_="rate_limit_exceeded")
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
        self.metrics.decisions.labels(decision.policy, decision.route.value, decision.reason).inc()
        if r.log_decisions:
            log.info("decision %s L=%d m=%d", decision.explain(), cached, len(prompt_ids) - cached)
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
        )
        self._acquire(plan)
        return plan

    # --- admission slots -----------------------------------------------------------------------------------------

    def _acquire(self, plan: RoutePlan) -> None:
        for b in plan.backends:
            b.inflight += 1
            b.inflight_tokens += plan.prompt_tokens
            self.metrics.inflight.labels(b.name).set(b.inflight)
        plan.decode.index.lock(plan.prompt_ids[: plan.decode_cached_tokens])

    def release(self, plan: RoutePlan) -> None:
        if plan.released:
            return
        plan.released = True
        plan.decode.index.lock(plan.prompt_ids[: plan.decode_cached_tokens], delta=-1)
        for b in plan.backends:
            b.inflight -= 1
            b.inflight_tokens -= plan.prompt_tokens
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
            ttft_ms=outcome.ttft_ms,
            tpot_ms=outcome.tpot_ms,
            e2e_ms=outcome.e2e_ms,
            kv_bytes=outcome.kv_bytes,
            decode_running_reqs=plan.decode_load.running_reqs,
            decode_running_kv_tokens=plan.decode_load.running_kv_tokens,
            prefill_queued_reqs=plan.prefill_load.queued_reqs if plan.prefill_load is not None else 0,
            server_timings=outcome.server_timings,
        )
        for policy in self.policies:  # every policy learns from every route, forced ones included
            observe = getattr(policy, "observe", None)
            if observe is not None:
                try:
                    observe(obs)
                except Exception:  # a calibration bug must not fail a served request
                    log.exception("policy %s observe failed", policy.name)
