"""The router's view of each backend server: health, live load, in-flight counts and its prefix index.

Health: /health every `router.health_interval_s`; a failed check or a request that cannot connect marks the server
unhealthy at once (a simple circuit breaker: no traffic until a health check passes again). A server that went down
lost its KV, so its prefix index is cleared. Load: /metrics every `router.metrics_poll_interval_s`, corrected between
polls by what this router itself started and finished there since the poll (`Backend.load`): the metrics count every
client of the server (other routers, direct traffic), the router's own counts are fresh. Readiness (which routes can
run with the servers that are healthy) is the router's: `Router.ready`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from dataclasses import dataclass, field
from typing import Literal

from ppd import specs
from ppd.config import ServerConfig, StackConfig
from ppd.policies import ServerLoad
from ppd.prefix_index import PrefixIndex
from ppd.sglang.client import BackendMetrics, SGLangClient
from router.metrics import RouterMetrics

log = logging.getLogger(__name__)

Role = Literal["prefill", "decode", "colocated"]


class Health(str, enum.Enum):
    UNKNOWN = "unknown"  # not checked yet: requests may try it, readiness waits
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


def spec_capacity_tokens(cfg: StackConfig, server: ServerConfig) -> int:
    """KV capacity in tokens from specs, until the server reports `max_total_num_tokens` itself."""
    if cfg.backend == "emulated" and cfg.emulator.kv_capacity_tokens > 0:
        return cfg.emulator.kv_capacity_tokens
    model = specs.model(cfg.model.spec)
    gpu = specs.gpu(server.gpu)
    frac = cfg.emulator.mem_fraction_static if cfg.backend == "emulated" else cfg.sglang.mem_fraction_static
    free_bytes = gpu.hbm_gib * 2**30 * frac - model.weight_bytes
    return max(1, int(free_bytes // model.kv_bytes_per_token))


@dataclass
class Backend:
    role: Role
    index_no: int
    server: ServerConfig
    index: PrefixIndex  # prefixes this server holds (decode/colocated: prompt + output; prefill: prompts)
    health: Health = Health.UNKNOWN
    metrics: BackendMetrics = field(default_factory=BackendMetrics)
    has_metrics: bool = False
    inflight: int = 0
    inflight_tokens: int = 0  # prompt tokens of the router's open requests (KV estimate when /metrics is absent)
    finished: int = 0  # the router's requests that have ended on this server (cumulative)
    at_poll: tuple[int, int] = (0, 0)  # (inflight, finished) when the current metrics were requested
    capacity_source: str = "specs"

    @property
    def name(self) -> str:
        return f"{self.role}{self.index_no}"

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def usable(self) -> bool:
        return self.health is not Health.UNHEALTHY

    def end_request(self, prompt_tokens: int) -> None:
        self.inflight -= 1
        self.inflight_tokens -= prompt_tokens
        self.finished += 1

    def live_counts(self) -> tuple[int, int]:
        """(running, queued): the polled metrics plus this router's requests started there since the poll, minus
        those it saw end (a finished request leaves the queue first, then the running set)."""
        m = self.metrics
        if not self.has_metrics:
            return 0, 0
        inflight0, finished0 = self.at_poll
        ended = self.finished - finished0
        started = (self.inflight + self.finished) - (inflight0 + finished0)
        queued = max(0, m.queued_reqs - ended)
        total = max(0, m.running_reqs + m.queued_reqs + started - ended)
        return max(0, total - queued), queued

    def load(self, max_inflight: int) -> ServerLoad:
        m = self.metrics
        running, queued = self.live_counts()
        return ServerLoad(
            url=self.url,
            gpu=self.server.gpu,
            healthy=self.usable,
            running_reqs=running,
            queued_reqs=queued,
            inflight=self.inflight,
            running_kv_tokens=m.used_tokens if self.has_metrics else self.inflight_tokens,
            token_usage=m.token_usage,
            max_inflight=max_inflight,
        )

    def load_key(self) -> tuple[int, int]:
        """Sort key for least-loaded: waiting work first, then running requests."""
        return (max(self.inflight, self.metrics.running_reqs + self.metrics.queued_reqs), self.metrics.running_reqs)


class BackendPool:
    def __init__(self, cfg: StackConfig, client: SGLangClient, metrics: RouterMetrics):
        self.cfg = cfg
        self.client = client
        self.metrics = metrics
        self.prefill = [self._make("prefill", i, s) for i, s in enumerate(cfg.prefill)]
        self.decode = [self._make("decode", i, s) for i, s in enumerate(cfg.decode)]
        self.colocated = [self._make("colocated", i, s) for i, s in enumerate(cfg.colocated)]
        self._tasks: list[asyncio.Task] = []
        self.checked = False  # every backend has had one health check (readiness waits for it)

    def _make(self, role: Role, i: int, server: ServerConfig) -> Backend:
        return Backend(role, i, server, PrefixIndex(spec_capacity_tokens(self.cfg, server)))

    @property
    def all(self) -> list[Backend]:
        return self.prefill + self.decode + self.colocated

    @property
    def serving(self) -> list[Backend]:
        """Servers that produce the answer: decode servers, or the colocated ones."""
        return self.colocated if self.cfg.mode == "colocated" else self.decode

    def total_inflight(self) -> int:
        return sum(b.inflight for b in self.serving)

    # --- health --------------------------------------------------------------------------------------------------

    def set_health(self, b: Backend, healthy: bool, why: str = "") -> None:
        new = Health.HEALTHY if healthy else Health.UNHEALTHY
        if new is b.health:
            return
        if new is Health.UNHEALTHY:
            log.warning(
                "backend %s (%s) unhealthy%s; its cache is presumed lost", b.name, b.url, f": {why}" if why else ""
            )
            b.index.clear()
        else:
            log.info("backend %s (%s) healthy", b.name, b.url)
            self._spawn(self._refresh_capacity(b))
        b.health = new
        self.metrics.backend_healthy.labels(b.name).set(1 if healthy else 0)

    def mark_failed(self, b: Backend, why: str) -> None:
        """A request could not reach `b`: stop sending it traffic until a health check passes."""
        self.set_health(b, False, why)

    async def _refresh_capacity(self, b: Backend) -> None:
        info = await self.client.server_info(b.url, timeout_s=self.cfg.router.connect_timeout_s)
        tokens = int((info or {}).get("max_total_num_tokens") or 0)
        if tokens > 0:
            b.index.capacity_tokens = tokens
            b.capacity_source = "server_info"
            if b.index.total_tokens > tokens:
                b.index.evict(b.index.total_tokens - tokens)

    async def check_health(self, b: Backend) -> None:
        ok = await self.client.health(b.url, timeout_s=max(self.cfg.router.connect_timeout_s, 1.0))
        self.set_health(b, ok, "" if ok else "/health failed")

    async def poll_metrics(self, b: Backend) -> None:
        at_poll = (b.inflight, b.finished)  # what the router had done there when the server was asked
        m = await self.client.metrics(b.url, timeout_s=max(self.cfg.router.connect_timeout_s, 1.0))
        if m is not None:
            b.metrics, b.has_metrics, b.at_poll = m, True, at_poll
            self.metrics.backend_queue.labels(b.name).set(m.queued_reqs)
            self.metrics.backend_running.labels(b.name).set(m.running_reqs)
        self.metrics.index_tokens.labels(b.name).set(b.index.total_tokens)

    # --- background loops ----------------------------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.client.keep(task)

    async def _loop(self, interval_s: float, fn, health: bool = False) -> None:
        while True:
            await asyncio.gather(*(fn(b) for b in self.all), return_exceptions=True)
            if health:
                self.checked = True
            await asyncio.sleep(interval_s)

    async def start(self) -> None:
        for b in self.all:
            self.metrics.inflight.labels(b.name).set(0)
            self.metrics.backend_healthy.labels(b.name).set(0)
        r = self.cfg.router
        self._tasks = [
            asyncio.create_task(self._loop(r.health_interval_s, self.check_health, health=True)),
            asyncio.create_task(self._loop(r.metrics_poll_interval_s, self.poll_metrics)),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
