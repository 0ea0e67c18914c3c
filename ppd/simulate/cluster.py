"""The simulated cluster: N prefill + M decode servers (or K colocated ones), KV links, and the router's choices.

Per request (SGLang PD + the AppendRouter, as router/routing.py and ppd/emulator do it):
- the router picks a decode (or colocated) server by prefix affinity (longest cached prefix, then the conversation's
  previous server, then the least loaded; servers at `max_inflight_per_backend` are skipped, and when all are, the
  request is rejected like the router's 429) and a prefill server by least load, builds a `RoutingInput` from the
  simulated state and asks the policy (ppd.policies) for the route;
- host-side overhead (HTTP, tokenizer, scheduler hops; `roofline.request_overhead_s`) delays the request;
- P-route: the decode server reserves KV for prompt + answer first (SGLang's pre-allocation; the prefill server does
  not start before it), the prefill server computes what its cache lacks, the KV moves over the link (a shared
  resource: the prefill GPU's egress and the decode GPU's ingress, or one link for all), then the request lands in
  the decode batch;
- D-route / colocated: the server reserves KV, prefills the part its cache lacks (prompt + earlier answers are
  cached after each turn), emits the first token and decodes;
- a computed prompt goes into that server's radix cache at once, the answer when the request ends (decode and
  colocated servers; prefill servers cache prompts only).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import simpy

from ppd import roofline, specs
from ppd.policies import PolicyContext, Route, RoutingInput, make_policy
from ppd.policies.base import Observation
from ppd.simulate.kvcache import Segment
from ppd.simulate.request import SimRequest
from ppd.simulate.server import SimServer
from ppd.simulate.trace import TraceRequest, arrival_window_s, conversations
from ppd.specs import KernelEfficiency


@dataclass(frozen=True)
class ClusterSpec:
    """Hardware, sizes and knobs of one simulated deployment."""

    prefill: int = 1
    decode: int = 1
    colocated: int = 0  # > 0: colocated mode (prefill and decode ignored)
    model: str = "llama-3-8b"  # ppd.specs.MODELS
    gpu: str = "h200"  # ppd.specs.GPUS, every server unless prefill_gpu / decode_gpu say otherwise
    prefill_gpu: str | None = None
    decode_gpu: str | None = None
    link: str = "nvlink"  # ppd.specs.LINKS
    link_gbytes_per_s: float | None = None  # override of the link's bandwidth
    # per-gpu: each GPU's port carries one move at a time; shared: one move at a time in the whole cluster;
    # none: moves never wait for each other (what the emulator models: each move takes its own link time)
    link_sharing: Literal["per-gpu", "shared", "none"] = "per-gpu"
    chunk_size: int = 8192  # chunked prefill: new tokens per forward
    max_running_requests: int = 256
    kv_capacity_tokens: int = 0  # 0 = from GPU memory x mem_fraction_static minus weights
    mem_fraction_static: float = 0.8
    delta_transfer: bool = False  # P-route moves only what the decode server lacks (else the whole prompt)
    request_overhead: bool = True  # add roofline.request_overhead_s to every request
    max_inflight_per_backend: int = 256  # router admission: a prefill server at it counts as saturated
    policy: str = "prefill"  # ppd.policies name (disaggregated mode)
    policy_params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.colocated < 0 or self.prefill < 0 or self.decode < 0:
            raise ValueError("server counts must be >= 0")
        if self.colocated == 0 and (self.prefill < 1 or self.decode < 1):
            raise ValueError("disaggregated mode needs at least one prefill and one decode server")

    @property
    def mode(self) -> str:
        return "colocated" if self.colocated > 0 else "disaggregated"

    @property
    def ratio(self) -> str:
        """P:D, with colocated as 0:K."""
        return f"0:{self.colocated}" if self.colocated > 0 else f"{self.prefill}:{self.decode}"

    @property
    def gpus(self) -> int:
        return self.colocated if self.colocated > 0 else self.prefill + self.decode

    def link_spec(self) -> specs.LinkSpec:
        base = specs.link(self.link)
        if self.link_gbytes_per_s is None:
            return base
        return specs.LinkSpec(base.name, self.link_gbytes_per_s, base.latency_ms)

    def policy_context(self) -> PolicyContext:
        return PolicyContext(
            model=self.model,
            prefill_gpu=self.prefill_gpu or self.gpu,
            decode_gpu=self.decode_gpu or self.gpu,
            link=self.link,
            link_gbytes_per_s=self.link_gbytes_per_s,
            chunk_size=self.chunk_size,
        )


def kv_capacity_tokens(gpu: specs.GpuSpec, model: specs.ModelSpec, mem_fraction_static: float = 0.8) -> int:
    """KV pool of one GPU: memory x mem_fraction_static minus the weights, in tokens (H200 + Llama-3-8B: ~810k;
    SGLang 0.5.10.post1 reported 788,603 on the same pair, NOTES.md)."""
    free = gpu.hbm_gib * 2**30 * mem_fraction_static - model.weight_bytes  # as ppd.emulator.server
    return max(0, int(free // model.kv_bytes_per_token))


@dataclass
class SimResult:
    spec: ClusterSpec
    requests: list[SimRequest]
    servers: list[SimServer]
    ports: dict[str, dict[str, float]]  # per link port: busy_s, bytes, transfers
    end_s: float  # simulated time at the end (last completion, or the drain limit)
    horizon_s: float  # the drain limit
    policy_name: str
    window_s: float  # seconds over which the trace's conversations start (goodput's denominator)


class Cluster:
    def __init__(self, spec: ClusterSpec, eff: KernelEfficiency = roofline.DEFAULT_EFFICIENCY):
        self.spec = spec
        self.env = simpy.Environment()
        self.model = specs.model(spec.model)
        self.eff = eff
        self.link = spec.link_spec()

        def make(role: str, i: int, gpu_name: str) -> SimServer:
            gpu = specs.gpu(gpu_name)
            cap = spec.kv_capacity_tokens or kv_capacity_tokens(gpu, self.model, spec.mem_fraction_static)
            return SimServer(
                self.env,
                f"{role}-{i}",
                role,
                self.model,
                gpu,
                cap,
                spec.chunk_size,
                spec.max_running_requests,
                spec.max_inflight_per_backend,
                eff,
            )

        if spec.colocated:
            self.prefill, self.decode = [], []
            self.colocated = [make("colocated", i, spec.gpu) for i in range(spec.colocated)]
        else:
            self.prefill = [make("prefill", i, spec.prefill_gpu or spec.gpu) for i in range(spec.prefill)]
            self.decode = [make("decode", i, spec.decode_gpu or spec.gpu) for i in range(spec.decode)]
            self.colocated = []
        self.policy = make_policy(spec.policy, context=spec.policy_context(), **dict(spec.policy_params))
        # link ports: one resource per GPU port (each carries one move at a time) or one for the whole cluster
        if spec.link_sharing == "shared":
            shared = simpy.Resource(self.env, 1)
            self._ports = {s.name: shared for s in self.prefill + self.decode}
            self._port_names = {s.name: "link" for s in self.prefill + self.decode}
        else:
            self._ports = {s.name: simpy.Resource(self.env, 1) for s in self.prefill + self.decode}
            self._port_names = {s.name: s.name for s in self.prefill + self.decode}
        self._port_stats: dict[str, dict[str, float]] = {}
        self._last_route: dict[str, Route] = {}
        self._last_server: dict[str, str] = {}
        self.requests: list[SimRequest] = []

    # --- running a trace ---

    def run(self, trace: Sequence[TraceRequest], drain_s: float = 120.0) -> SimResult:
        """Serve every conversation of `trace`; stop at the last arrival + `drain_s` (unfinished requests stay so)."""
        convs = conversations(trace)
        for turns in convs.values():
            self.env.process(self._conversation(turns))
        last_arrival = max((r.arrival_s for r in trace), default=0.0)
        horizon = last_arrival + drain_s
        self._remaining = len(trace)
        self._all_done = self.env.event()
        if self._remaining:
            self.env.run(until=self.env.any_of([self._all_done, self.env.timeout(horizon)]))
        return SimResult(
            self.spec,
            self.requests,
            self.prefill + self.decode + self.colocated,
            self._port_stats,
            self.env.now,
            horizon,
            getattr(self.policy, "name", self.spec.policy),
            arrival_window_s(trace) or self.env.now,
        )

    def _conversation(self, turns: Sequence[TraceRequest]):
        env = self.env
        prev: TraceRequest | None = None
        prev_segs: tuple[Segment, ...] = ()
        prev_done = 0.0
        for tr in turns:
            segs = _segments(tr, prev, prev_segs)
            issue = tr.arrival_s if prev is None else max(tr.arrival_s, prev_done + tr.think_s)
            if issue > env.now:
                yield env.timeout(issue - env.now)
            cid, k = tr.conversation_id, tr.turn
            req = SimRequest(tr, segs, (("c", cid, k, "o"), tr.output_tokens), env.event(), issue_s=env.now)
            self.requests.append(req)
            yield from self._serve(req)
            prev, prev_segs, prev_done = tr, segs, env.now
            self._remaining -= 1
            if self._remaining == 0:
                self._all_done.succeed()

    def _serve(self, req: SimRequest):
        cid = req.trace.conversation_id
        serving = self.colocated or self.decode
        d = self._pick_serving(serving, req, self._last_server.get(cid))
        if d is None:
            req.failed = "rejected: every server at its in-flight limit (the router's 429)"
            return
        self._last_server[cid] = d.name
        req.decode_server = d.name
        if self.colocated:
            req.route, req.reason = Route.COLOCATED.value, "colocated"
            req.decode_cached_tokens = _usable(d.pool.match(req.segs), req.prompt_tokens)
            d.inflight += 1
            yield from self._overhead(req)
            yield from self._local(d, req)
            d.inflight -= 1
            return
        p = self._pick_prefill()
        x = RoutingInput(
            prompt_tokens=req.prompt_tokens,
            decode_cached_tokens=_usable(d.pool.match(req.segs), req.prompt_tokens),
            prefill_cached_tokens=_usable(p.pool.match(req.segs), req.prompt_tokens),
            max_new_tokens=req.output_tokens,
            prefill=p.load(),
            decode=d.load(),
            previous_route=self._last_route.get(cid),
        )
        decision = self.policy.decide(x)
        self._last_route[cid] = decision.route
        req.route, req.reason = decision.route.value, decision.reason
        req.decode_cached_tokens, req.prefill_cached_tokens = x.decode_cached_tokens, x.prefill_cached_tokens
        d.inflight += 1
        if decision.route == Route.PREFILL:
            req.prefill_server = p.name
            p.inflight += 1
            yield from self._overhead(req)
            yield from self._p_route(p, d, req)
            p.inflight -= 1
        else:
            yield from self._overhead(req)
            yield from self._local(d, req)
        d.inflight -= 1
        self._observe(req, x)

    def _overhead(self, req: SimRequest):
        if self.spec.request_overhead:
            yield self.env.timeout(roofline.request_overhead_s(req.prompt_tokens, self.eff))
        req.enqueue_s = self.env.now

    def _local(self, server: SimServer, req: SimRequest):
        """D-route or colocated: reserve KV, prefill what the cache lacks, decode, cache prompt + answer."""
        cached, path = server.pool.lock_prefix(req.segs, req.prompt_tokens - 1)
        new = req.prompt_tokens - cached
        granted = server.pool.reserve(new + req.output_tokens)
        if granted is None:
            req.failed = f"needs {new + req.output_tokens} KV tokens, {server.name} holds {server.pool.capacity_tokens}"
            server.pool.unlock(path)
            return
        yield granted
        req.admitted_s = req.prefill_ready_s = self.env.now
        req.cached_tokens = cached
        yield server.submit_prefill(req, new, cached)
        path = server.pool.commit(req.segs, path, new)
        yield req.finished
        server.pool.release(req.output_tokens, insert=req.segs + (req.out_seg,))
        server.pool.unlock(path)

    def _p_route(self, p: SimServer, d: SimServer, req: SimRequest):
        env = self.env
        # decode pre-allocation first: SGLang's prefill server waits for the decode side's KV slots
        if self.spec.delta_transfer:
            d_cached, d_path = d.pool.lock_prefix(req.segs, req.prompt_tokens - 1)
        else:
            d_cached, d_path = 0, []
        d_need = req.prompt_tokens - d_cached + req.output_tokens
        d_granted = d.pool.reserve(d_need)
        if d_granted is None:
            req.failed = f"needs {d_need} KV tokens, {d.name} holds {d.pool.capacity_tokens}"
            d.pool.unlock(d_path)
            return
        yield d_granted
        req.admitted_s = env.now
        p_cached, p_path = p.pool.lock_prefix(req.segs, req.prompt_tokens - 1)
        p_new = req.prompt_tokens - p_cached
        p_granted = p.pool.reserve(p_new)
        if p_granted is None:
            req.failed = f"needs {p_new} KV tokens, {p.name} holds {p.pool.capacity_tokens}"
            p.pool.unlock(p_path)
            d.pool.release(d_need)
            d.pool.unlock(d_path)
            return
        yield p_granted
        req.prefill_ready_s = env.now
        req.cached_tokens = p_cached
        yield p.submit_prefill(req, p_new, p_cached)
        p_path = p.pool.commit(req.segs, p_path, p_new)  # prefill servers cache the prompt as soon as it is computed
        # the KV moves over the link: hold the prefill GPU's egress, then the decode GPU's ingress
        nbytes = roofline.kv_bytes(self.model, req.prompt_tokens - d_cached)
        ports = [self._ports[p.name], self._ports[d.name]]
        names = [self._port_names[p.name], self._port_names[d.name]]
        if ports[0] is ports[1]:
            ports, names = ports[:1], names[:1]
        if self.spec.link_sharing == "none":
            ports = []
        held = []
        for port in ports:
            r = port.request()
            held.append(r)
            yield r
        req.transfer_start_s = env.now
        dt = roofline.transfer_time_s(self.link, nbytes)
        yield env.timeout(dt)
        for port, r in zip(ports, held, strict=True):
            port.release(r)
        req.transfer_end_s = env.now
        req.kv_bytes = nbytes
        for name in names:
            st = self._port_stats.setdefault(name, {"busy_s": 0.0, "bytes": 0, "transfers": 0})
            st["busy_s"] += dt
            st["bytes"] += nbytes
            st["transfers"] += 1
        p.pool.unlock(p_path)
        d.submit_join(req)
        yield req.finished
        d.pool.release(d_need, insert=req.segs + (req.out_seg,))
        d.pool.unlock(d_path)

    # --- the router's choices (router/routing.py) ---

    def _pick_serving(self, servers: list[SimServer], req: SimRequest, previous: str | None) -> SimServer | None:
        """Longest cached prefix, then the conversation's previous server, then the least loaded."""
        free = [s for s in servers if s.inflight < self.spec.max_inflight_per_backend]
        if not free:
            return None
        return max(free, key=lambda s: (s.pool.match(req.segs), s.name == previous, tuple(-k for k in _load_key(s))))

    def _pick_prefill(self) -> SimServer:
        return min(self.prefill, key=_load_key)

    def _observe(self, req: SimRequest, x: RoutingInput) -> None:
        observe = getattr(self.policy, "observe", None)
        if observe is None or not req.done:
            return
        tpot = (req.last_token_s - req.first_token_s) * 1e3 / (req.output_tokens - 1) if req.output_tokens > 1 else None
        observe(
            Observation(
                route=Route(req.route),
                prompt_tokens=req.prompt_tokens,
                decode_cached_tokens=x.decode_cached_tokens,
                prefill_cached_tokens=req.cached_tokens if req.route == Route.PREFILL.value else 0,
                completion_tokens=req.output_tokens,
                ttft_ms=(req.first_token_s - req.issue_s) * 1e3,
                tpot_ms=tpot,
                e2e_ms=(req.last_token_s - req.issue_s) * 1e3,
                kv_bytes=req.kv_bytes,
                decode_running_reqs=x.decode.running_reqs,
                decode_running_kv_tokens=x.decode.running_kv_tokens,
                prefill_queued_reqs=x.prefill.queued_reqs if x.prefill else 0,
                server_timings=_server_timings(req),
            )
        )


def _load_key(s: SimServer) -> tuple[int, int]:
    """The router's least-loaded order: waiting work first, then running requests (router/backends.py)."""
    queued = len(s.prefill_q) + len(s.join_q) + s.pool.waiting
    return (max(s.inflight, s.n_running + queued), s.n_running)


def _usable(matched: int, prompt_tokens: int) -> int:
    """A server recomputes at least the last prompt token (it needs its logits)."""
    return max(0, min(matched, prompt_tokens - 1))


def _server_timings(req: SimRequest) -> dict[str, float]:
    out = {"queue_ms": (req.prefill_start_s - req.enqueue_s) * 1e3, "prefill_ms": 0.0}
    out["prefill_ms"] = (req.prefill_end_s - req.prefill_start_s) * 1e3
    if not math.isnan(req.transfer_end_s):
        out["transfer_ms"] = (req.transfer_end_s - req.transfer_start_s) * 1e3
    return out


def _segments(tr: TraceRequest, prev: TraceRequest | None, prev_segs: tuple[Segment, ...]) -> tuple[Segment, ...]:
    """The prompt as a segment chain: [shared prefix] + user/answer segments of every turn so far."""
    cid, k = tr.conversation_id, tr.turn
    if prev is not None:
        new = tr.prompt_tokens - prev.prompt_tokens - prev.output_tokens
        if new >= 0:
            chain = prev_segs + ((("c", cid, prev.turn, "o"), prev.output_tokens),)
            return chain + (((("c", cid, k, "u"), new),) if new > 0 else ())
    chain: tuple[Segment, ...] = ()
    if tr.prefix_id is not None and tr.prefix_tokens > 0:
        chain = ((("p", tr.prefix_id), tr.prefix_tokens),)
    rest = tr.prompt_tokens - tr.prefix_tokens
    return chain + (((("c", cid, k, "u" if prev is None else "fresh"), rest),) if rest > 0 else ())


def simulate(
    trace: Sequence[TraceRequest],
    spec: ClusterSpec,
    drain_s: float = 120.0,
    eff: KernelEfficiency = roofline.DEFAULT_EFFICIENCY,
) -> SimResult:
    """Run `trace` on the cluster `spec`; the result holds every request's timeline and every server's counters."""
    return Cluster(spec, eff).run(trace, drain_s)
