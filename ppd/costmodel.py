"""Cost of each route for one append-prefill: T_P and T_D as pure functions over plain data (no I/O, no clocks).

P-route (SGLang PD): wait in the prefill server's queue, prefill the tokens the prefill server lacks on top of what it
has cached, move the KV of the *whole prompt* to the decode server (SGLang's PD sends every prompt token's KV, cached
prefix included), then the decode server admits the request at its next step boundary. The KV of each finished chunk
of a chunked prefill is sent while the next chunk computes (`send_kv_chunk` in sglang/srt/disaggregation/prefill.py),
so only what is still on the wire after the last chunk adds to TTFT. The running decodes pay a small stall when the
request's KV lands and it joins their batch (`roofline.kv_landing_time_s`; NOTES.md: 3-22 ms per stream).

D-route (local append): wait for the decode server's current step to end, prefill the m new tokens over the L cached
on the decode GPU; every running stream waits that long (NOTES.md: "others' max gap" minus their TPOT is about the
append's own prefill time), so the interference is prefill time x running requests, weighted.

Both costs are in ms: the append's own TTFT plus `interference_weight` x the extra time summed over the running
streams (issue 11's cost; NOTES.md's "cost" column counts a single stream, i.e. weight 1/N). All GPU timing comes from `ppd.roofline`; the cost model only scales the specs' achieved
FLOP/s and bandwidth by calibrated factors (`ppd.calibration`) and composes the terms.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ppd import roofline
from ppd.policies.base import PolicyContext, Route, RouteScore, RoutingInput, ServerLoad
from ppd.specs import GpuSpec, KernelEfficiency, LinkSpec, ModelSpec, gpu, link, model

# Fitted by calibration; everything else in CostParams comes from specs or config.
FITTED_FIELDS = (
    "prefill_compute_scale",
    "prefill_memory_scale",
    "decode_compute_scale",
    "decode_memory_scale",
    "link_bytes_per_s",
    "link_latency_ms",
    "prefill_route_overhead_ms",
    "decode_route_overhead_ms",
)


@dataclass(frozen=True)
class CostParams:
    """Everything the cost model needs, as effective values. Build with `CostParams.from_specs` or `from_context`."""

    model: ModelSpec
    prefill_gpu: GpuSpec  # datasheet peaks; the scales below turn them into what this deployment achieves
    decode_gpu: GpuSpec
    link_bytes_per_s: float  # effective KV payload bandwidth prefill -> decode
    link_latency_ms: float  # per transfer: bootstrap handshake, aux data, completion poll
    prefill_route_overhead_ms: float  # host-side cost per P-route request (two HTTP hops, tokenizer, schedulers)
    decode_route_overhead_ms: float  # the same for a D-route request (one server)
    eff: KernelEfficiency = roofline.DEFAULT_EFFICIENCY
    chunk_size: int = 8192
    # Multipliers of achieved FLOP/s (every prefill kernel) and HBM bandwidth (prefix read, decode step) per side.
    prefill_compute_scale: float = 1.0
    prefill_memory_scale: float = 1.0
    decode_compute_scale: float = 1.0
    decode_memory_scale: float = 1.0
    interference_weight: float = 1.0  # 0 = the append's TTFT alone; 1 = every stream's lost ms counts like its own
    # Expected service time of one request already queued on a server; None = use this request's own prefill time.
    prefill_service_ms: float | None = None
    decode_service_ms: float | None = None

    @classmethod
    def from_specs(
        cls,
        model_spec: ModelSpec,
        prefill_gpu: GpuSpec,
        decode_gpu: GpuSpec,
        link_spec: LinkSpec,
        eff: KernelEfficiency = roofline.DEFAULT_EFFICIENCY,
        chunk_size: int = 8192,
        **overrides: float | None,
    ) -> CostParams:
        base = cls(
            model=model_spec,
            prefill_gpu=prefill_gpu,
            decode_gpu=decode_gpu,
            link_bytes_per_s=link_spec.bytes_per_s,
            link_latency_ms=link_spec.latency_ms,
            prefill_route_overhead_ms=eff.request_overhead_ms,
            decode_route_overhead_ms=eff.request_overhead_ms,
            eff=eff,
            chunk_size=chunk_size,
        )
        return base.with_values(**overrides)

    @classmethod
    def from_context(cls, ctx: PolicyContext, **overrides: float | None) -> CostParams:
        lk = link(ctx.link)
        if ctx.link_gbytes_per_s is not None:
            lk = dataclasses.replace(lk, gbytes_per_s=ctx.link_gbytes_per_s)
        return cls.from_specs(
            model(ctx.model), gpu(ctx.prefill_gpu), gpu(ctx.decode_gpu), lk, chunk_size=ctx.chunk_size, **overrides
        )

    def with_values(self, **values: float | None) -> CostParams:
        """A copy with some numeric fields replaced (config overrides, calibration); unknown names raise ValueError."""
        known = tunable_fields()
        bad = sorted(set(values) - set(known))
        if bad:
            raise ValueError(f"unknown cost-model parameter(s) {', '.join(bad)}; known: {', '.join(known)}")
        return dataclasses.replace(self, **values) if values else self

    @property
    def prefill_gpu_effective(self) -> GpuSpec:
        return _scaled(self.prefill_gpu, self.prefill_compute_scale, self.prefill_memory_scale)

    @property
    def decode_gpu_effective(self) -> GpuSpec:
        return _scaled(self.decode_gpu, self.decode_compute_scale, self.decode_memory_scale)

    def summary(self) -> dict[str, float | str | None]:
        """JSON-able view: names, the tunable numbers and the effective rates they imply."""
        out: dict[str, float | str | None] = {
            "model": self.model.name,
            "prefill_gpu": self.prefill_gpu.name,
            "decode_gpu": self.decode_gpu.name,
            "chunk_size": self.chunk_size,
        }
        for name in tunable_fields():
            out[name] = getattr(self, name)
        for side, g in (("prefill", self.prefill_gpu_effective), ("decode", self.decode_gpu_effective)):
            out[f"{side}_linear_tflops"] = g.flops * self.eff.linear_mfu / 1e12
            out[f"{side}_extend_prefix_gbps"] = g.hbm_bytes_per_s * self.eff.extend_prefix_bw_frac / 1e9
            out[f"{side}_decode_gbps"] = g.hbm_bytes_per_s * self.eff.decode_bw_frac / 1e9
        out["link_gbytes_per_s"] = self.link_bytes_per_s / 1e9
        return out


def tunable_fields() -> tuple[str, ...]:
    """Numeric CostParams fields a config or calibration may set."""
    skip = {"model", "prefill_gpu", "decode_gpu", "eff", "chunk_size"}
    return tuple(f.name for f in dataclasses.fields(CostParams) if f.name not in skip)


def _scaled(g: GpuSpec, compute_scale: float, memory_scale: float) -> GpuSpec:
    return dataclasses.replace(g, bf16_tflops=g.bf16_tflops * compute_scale, hbm_tbps=g.hbm_tbps * memory_scale)


@dataclass(frozen=True)
class RoutePrediction:
    """One route's predicted cost for one request, with its named parts (ms)."""

    route: Route
    ttft_ms: float  # the append's own time to first token
    interference_ms: float  # weighted extra ms summed over the decode server's running streams
    kv_bytes: int  # KV moved prefill -> decode
    terms: dict[str, float]  # parts of cost_ms

    @property
    def cost_ms(self) -> float:
        return self.ttft_ms + self.interference_ms

    def score(self) -> RouteScore:
        return RouteScore(self.route, self.cost_ms, dict(self.terms))


def prefill_chunks_s(
    model_spec: ModelSpec, g: GpuSpec, new_tokens: int, cached_tokens: int, chunk_size: int, eff: KernelEfficiency
) -> list[float]:
    """GPU seconds of each chunk of a chunked prefill (each chunk attends to everything before it)."""
    out = []
    prefix = cached_tokens
    for n in roofline.chunk_sizes(new_tokens, chunk_size):
        out.append(roofline.prefill_chunk_breakdown(model_spec, g, n, prefix, eff).total_s)
        prefix += n
    return out


def kv_chunk_bytes(model_spec: ModelSpec, new_tokens: int, cached_tokens: int, chunk_size: int) -> list[int]:
    """KV bytes sent after each chunk: the first send also carries the cached prefix (PD sends the whole prompt)."""
    sizes = roofline.chunk_sizes(new_tokens, chunk_size)
    return [roofline.kv_bytes(model_spec, n + (cached_tokens if i == 0 else 0)) for i, n in enumerate(sizes)]


def exposed_transfer_s(
    chunks_s: list[float], chunk_bytes: list[int], link_bytes_per_s: float, latency_s: float
) -> float:
    """Transfer time left after the last chunk computes: chunk k is sent once computed, sends are serial on the link."""
    compute_end = 0.0
    send_end = 0.0
    for c, b in zip(chunks_s, chunk_bytes, strict=True):
        compute_end += c
        send_end = max(send_end, compute_end) + b / link_bytes_per_s
    return latency_s + max(0.0, send_end - compute_end)


def decode_step_ms(params: CostParams, load: ServerLoad) -> float:
    """The decode server's current step time (0 when idle)."""
    return 1e3 * roofline.decode_step_time_s(
        params.model, params.decode_gpu_effective, load.running_reqs, load.running_kv_tokens, params.eff
    )


def _queue_wait_ms(load: ServerLoad, service_ms: float) -> float:
    """Work ahead of a new request: the queued ones in full, the running one half done on average."""
    queued, running = load.queued_reqs, load.running_reqs
    if queued == 0 and running == 0 and load.inflight > 0:  # no metrics yet: trust the router's own count
        running, queued = 1, load.inflight - 1
    return (queued + (0.5 if running > 0 else 0.0)) * service_ms


def _host_overhead_ms(params: CostParams, fixed_ms: float, prompt_tokens: int) -> float:
    return fixed_ms + params.eff.per_token_overhead_us * prompt_tokens / 1e3


def _split(prompt_tokens: int, cached_tokens: int) -> tuple[int, int]:
    """(new, cached): a server always recomputes at least the last prompt token."""
    cached = max(0, min(cached_tokens, prompt_tokens - 1))
    return max(1, prompt_tokens - cached), cached


def predict_prefill_route(x: RoutingInput, params: CostParams) -> RoutePrediction:
    """T_P: prefill-queue wait + prefill of the uncached tokens on P + exposed KV transfer + decode admission."""
    new, cached = _split(x.prompt_tokens, x.prefill_cached_tokens)
    chunks = prefill_chunks_s(params.model, params.prefill_gpu_effective, new, cached, params.chunk_size, params.eff)
    prefill_ms = 1e3 * sum(chunks)
    kv = roofline.kv_bytes(params.model, x.prompt_tokens)
    transfer_ms = 1e3 * exposed_transfer_s(
        chunks, kv_chunk_bytes(params.model, new, cached, params.chunk_size), params.link_bytes_per_s,
        params.link_latency_ms / 1e3,
    )  # fmt: skip
    service = params.prefill_service_ms if params.prefill_service_ms is not None else prefill_ms
    queue_ms = _queue_wait_ms(x.prefill, service) if x.prefill is not None else 0.0
    step_ms = decode_step_ms(params, x.decode)
    admission_ms = 0.5 * step_ms  # the transferred request joins at the next step boundary
    landing_ms = 1e3 * roofline.kv_landing_time_s(
        params.model, params.decode_gpu_effective, x.prompt_tokens, params.eff
    )
    interference = params.interference_weight * x.decode.running_reqs * landing_ms
    terms = {
        "overhead_ms": _host_overhead_ms(params, params.prefill_route_overhead_ms, x.prompt_tokens),
        "queue_ms": queue_ms,
        "prefill_ms": prefill_ms,
        "transfer_ms": transfer_ms,
        "admission_ms": admission_ms,
    }
    ttft = sum(terms.values())
    terms["interference_ms"] = interference
    return RoutePrediction(Route.PREFILL, ttft, interference, kv, terms)


def predict_decode_route(x: RoutingInput, params: CostParams) -> RoutePrediction:
    """T_D: decode-server wait + append-prefill of m over L on the decode GPU + the stall it puts on running streams."""
    new, cached = _split(x.prompt_tokens, x.decode_cached_tokens)
    chunks = prefill_chunks_s(params.model, params.decode_gpu_effective, new, cached, params.chunk_size, params.eff)
    prefill_ms = 1e3 * sum(chunks)
    service = params.decode_service_ms if params.decode_service_ms is not None else prefill_ms
    step_ms = decode_step_ms(params, x.decode)
    wait_ms = 0.5 * step_ms + x.decode.queued_reqs * service
    interference = params.interference_weight * x.decode.running_reqs * prefill_ms
    terms = {
        "overhead_ms": _host_overhead_ms(params, params.decode_route_overhead_ms, x.prompt_tokens),
        "wait_ms": wait_ms,
        "prefill_ms": prefill_ms,
    }
    ttft = sum(terms.values())
    terms["interference_ms"] = interference
    return RoutePrediction(Route.DECODE, ttft, interference, 0, terms)


def route_costs(x: RoutingInput, params: CostParams) -> tuple[RouteScore, RouteScore]:
    """(P-route score, D-route score) with named terms; cost_ms = TTFT + weighted interference."""
    return predict_prefill_route(x, params).score(), predict_decode_route(x, params).score()


def synthetic_input(
    decode_cached_tokens: int,
    append_len: int,
    *,
    prefill_cached_tokens: int | None = None,
    background_streams: int = 0,
    background_context: int = 2560,
    prefill_queued: int = 0,
    max_new_tokens: int = 8,
    previous_route: Route | None = None,
) -> RoutingInput:
    """A RoutingInput from scalars (decision maps, simulator, tests): L cached on D, m new, N streams decoding there.

    By default the prefill server holds the same L prefix (the best case for the P-route, as in NOTES.md's runs).
    """
    prompt = decode_cached_tokens + append_len
    return RoutingInput(
        prompt_tokens=prompt,
        decode_cached_tokens=decode_cached_tokens,
        prefill_cached_tokens=decode_cached_tokens if prefill_cached_tokens is None else prefill_cached_tokens,
        max_new_tokens=max_new_tokens,
        # every request came through the router, so its in-flight counts match the servers' metrics
        prefill=ServerLoad(url="prefill", queued_reqs=prefill_queued, inflight=prefill_queued),
        decode=ServerLoad(
            url="decode",
            running_reqs=background_streams,
            running_kv_tokens=background_streams * background_context,
            inflight=background_streams,
        ),
        previous_route=previous_route,
    )
