"""Prometheus metrics of one emulated server, under SGLang's names (ppd.sglang.protocol.METRIC_*) plus our KV-transfer
counters. One registry per app, so several servers in one process (tests) never share counters."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from ppd.sglang import protocol


class EmulatorMetrics:
    def __init__(self, model_name: str, engine_type: str):
        self.registry = CollectorRegistry()
        self._labels = {"model_name": model_name, "engine_type": engine_type}
        names = list(self._labels)
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=r)

        self.running = gauge(protocol.METRIC_RUNNING, "The number of running requests.")
        self.queued = gauge(protocol.METRIC_QUEUED, "The number of requests in the waiting queue.")
        self.token_usage = gauge(protocol.METRIC_TOKEN_USAGE, "The token usage.")
        self.used_tokens = gauge(protocol.METRIC_USED_TOKENS, "The number of used tokens.")
        self.max_total_tokens = gauge(
            protocol.METRIC_MAX_TOTAL_TOKENS, "Maximum total number of tokens in the KV pool."
        )
        self.cache_hit_rate = gauge(protocol.METRIC_CACHE_HIT_RATE, "The prefix cache hit rate.")
        self.gen_throughput = gauge(protocol.METRIC_GEN_THROUGHPUT, "The generation throughput (token/s).")
        self.decode_sum_seq_lens = gauge(protocol.METRIC_DECODE_SUM_SEQ_LENS, "Sum of running requests' lengths.")
        self.prealloc_queue = gauge("sglang:num_decode_prealloc_queue_reqs", "Decode requests waiting for memory.")
        self.transfer_queue = gauge("sglang:num_decode_transfer_queue_reqs", "Decode requests waiting for their KV.")
        self.prompt_tokens = Counter(
            protocol.METRIC_PROMPT_TOKENS_TOTAL, "Number of prefill tokens processed.", names, registry=r
        )
        self.generation_tokens = Counter(
            protocol.METRIC_GENERATION_TOKENS_TOTAL, "Number of generation tokens processed.", names, registry=r
        )
        self.kv_bytes = Counter(
            "ppd_emulator_kv_transfer_bytes_total",
            "KV bytes moved over Mooncake (after kv_bytes_scale).",
            [*names, "direction"],
            registry=r,
        )
        self.kv_seconds = Counter(
            "ppd_emulator_kv_transfer_seconds_total",
            "Wall seconds of Mooncake KV writes (send: measured by the writer; recv: as reported with the aux data).",
            [*names, "direction"],
            registry=r,
        )
        self.kv_integrity_errors = Counter(
            "ppd_emulator_kv_integrity_errors_total",
            "KV buffers whose checksum did not match the sender's.",
            names,
            registry=r,
        )
        # zero-valued series exist from the start, so scrapers see every name
        for direction in ("send", "recv"):
            self.kv_bytes.labels(**self._labels, direction=direction)
            self.kv_seconds.labels(**self._labels, direction=direction)
        self.kv_integrity_errors.labels(**self._labels)

    def bind(self, gauge: Gauge, fn: Callable[[], float]) -> None:
        """A gauge read live at scrape time."""
        gauge.labels(**self._labels).set_function(fn)

    def count_tokens(self, prompt_tokens: int, generation_tokens: int) -> None:
        self.prompt_tokens.labels(**self._labels).inc(prompt_tokens)
        self.generation_tokens.labels(**self._labels).inc(generation_tokens)

    def count_transfer(self, direction: str, nbytes: int, seconds: float) -> None:
        self.kv_bytes.labels(**self._labels, direction=direction).inc(nbytes)
        self.kv_seconds.labels(**self._labels, direction=direction).inc(seconds)

    def count_integrity_error(self) -> None:
        self.kv_integrity_errors.labels(**self._labels).inc()

    def sample(self, name: str, **extra: str) -> float:
        """Current value of one of our series (e.g. "ppd_emulator_kv_transfer_bytes_total", direction="send")."""
        return self.registry.get_sample_value(name, {**self._labels, **extra}) or 0.0
