"""One emulated SGLang server: its engine (the GPU), KV transfer, radix cache and the request flows of each mode.

Flows (each request runs as its own task; the HTTP layer only watches the Job):
- colocated, and local append on a decode server (D-route): host overhead -> "compute" the prompt's KV rows and
  digest -> reserve memory -> prefill (cached prefix skipped) -> decode.
- PD prefill: host overhead -> wait until the decode server of the same bootstrap_room registered its receive buffer
  -> prefill -> Mooncake write of the prompt's KV (kv_bytes / kv_bytes_scale) -> wait out the link model's time ->
  aux (first token, checksum) to the decode server -> answer (first token, finish length 0, like SGLang).
- PD decode: host overhead -> reserve memory -> register a receive buffer for the room with the prefill's bootstrap
  server -> wait for the aux (up to waiting_timeout_s) -> verify the checksum -> derive the tokens from the bytes it
  received -> join the running batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, replace

import httpx
import numpy as np

from ppd import roofline, specs
from ppd.config import ServerConfig, StackConfig, resolve_path
from ppd.emulator import kvdata
from ppd.emulator.engine import CapacityError, Engine, EngineSpec, Job, finish_abort, finish_length
from ppd.emulator.metrics import EmulatorMetrics
from ppd.emulator.schemas import GenerateRequest, KVAux, RequestError, RoomRegistration
from ppd.emulator.transfer import KVTransfer, RemoteBuffer, TransferError, flip_in_transit
from ppd.sglang.protocol import SGLANG_VERSION
from ppd.tokenizer import ChatTokenizer

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "colocated")


class ServerConfigError(ValueError):
    """The config cannot describe this server (unknown role/index/GPU/model, impossible sizes)."""


def select_server(cfg: StackConfig, role: str, index: int) -> ServerConfig:
    if role not in ROLES:
        raise ServerConfigError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    servers = {"prefill": cfg.prefill, "decode": cfg.decode, "colocated": cfg.colocated}[role]
    if not 0 <= index < len(servers):
        raise ServerConfigError(f"no {role} server with index {index}: the config lists {len(servers)}")
    return servers[index]


def kv_capacity_tokens(cfg: StackConfig, model: specs.ModelSpec, gpu: specs.GpuSpec) -> int:
    """KV pool size: (mem_fraction_static x HBM - weights) / KV bytes per token, unless set in the config."""
    if cfg.emulator.kv_capacity_tokens > 0:
        return cfg.emulator.kv_capacity_tokens
    free = gpu.hbm_gib * 2**30 * cfg.emulator.mem_fraction_static - model.weight_bytes
    if free <= model.kv_bytes_per_token:
        raise ServerConfigError(f"{model.name} does not fit on {gpu.name} with mem_fraction_static")
    return int(free // model.kv_bytes_per_token)


def link_spec(cfg: StackConfig) -> specs.LinkSpec:
    spec = specs.link(cfg.link.kind)
    if cfg.link.gbytes_per_s is not None:
        spec = replace(spec, gbytes_per_s=cfg.link.gbytes_per_s)
    return spec


@dataclass
class PendingKV:
    """Decode side: one room's receive buffer and the aux it waits for."""

    buf: np.ndarray
    ptr: int
    aux: asyncio.Future


class EmulatedServer:
    def __init__(self, cfg: StackConfig, role: str, index: int = 0):
        self.cfg = cfg
        self.role = role
        self.index = index
        self.server = select_server(cfg, role, index)
        if role == "prefill" and self.server.bootstrap_port is None:
            raise ServerConfigError("a prefill server needs bootstrap_port")
        try:
            self.model = specs.model(cfg.model.spec)
            self.gpu = specs.gpu(self.server.gpu)
            self.link = link_spec(cfg)
        except KeyError as err:
            raise ServerConfigError(str(err.args[0])) from None
        em = cfg.emulator
        if em.time_scale <= 0:
            raise ServerConfigError("emulator.time_scale must be > 0")
        if em.kv_bytes_scale < 1 or self.model.kv_bytes_per_token % em.kv_bytes_scale:
            raise ServerConfigError(
                f"emulator.kv_bytes_scale ({em.kv_bytes_scale}) must divide the KV bytes per token of "
                f"{self.model.name} ({self.model.kv_bytes_per_token})"
            )
        if em.waiting_timeout_s <= 0:
            raise ServerConfigError("emulator.waiting_timeout_s must be > 0")
        self.time_scale = em.time_scale
        self.wire_bytes_per_token = self.model.kv_bytes_per_token // em.kv_bytes_scale
        self.eff = roofline.DEFAULT_EFFICIENCY
        self.capacity_tokens = kv_capacity_tokens(cfg, self.model, self.gpu)
        try:
            self.tokenizer = ChatTokenizer.load(cfg.model.tokenizer)
        except (FileNotFoundError, OSError, ValueError) as err:
            raise ServerConfigError(f"model.tokenizer: {err}") from None
        special = set(self.tokenizer.special_ids) | set(self.tokenizer.eos_ids)
        self.allowed_ids = np.array([i for i in range(self.tokenizer.vocab_size) if i not in special], dtype=np.int64)
        self.input_vocab_size = max(self.model.vocab, self.tokenizer.vocab_size)
        self.kv_seed = kvdata.seed64("kv", self.model.name, em.seed)
        self.engine = Engine(
            EngineSpec(
                model=self.model,
                gpu=self.gpu,
                eff=self.eff,
                time_scale=em.time_scale,
                chunk_size=em.chunk_size,
                max_running_requests=em.max_running_requests,
                capacity_tokens=self.capacity_tokens,
                role=role,  # type: ignore[arg-type]
            )
        )
        self.metrics = EmulatorMetrics(cfg.model.served_name, role)
        self._bind_metrics()
        self.engine.on_finish = self._on_finish
        self.transfer: KVTransfer | None = None
        self.http: httpx.AsyncClient | None = None
        self.rooms: dict[int, tuple[float, asyncio.Future]] = {}  # prefill: room -> decode's registration
        self.pending_kv: dict[int, PendingKV] = {}  # decode: room -> receive buffer
        self.tasks: set[asyncio.Task] = set()
        self.started_at = time.time()

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.role in ("prefill", "decode"):
            self.transfer = KVTransfer(self.server.host)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(10.0), limits=httpx.Limits(keepalive_expiry=2.0))
        self.engine.start()

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await self.engine.stop()
        if self.http is not None:
            await self.http.aclose()
        if self.transfer is not None:
            self.transfer.close()

    def _bind_metrics(self) -> None:
        m, e = self.metrics, self.engine
        m.bind(m.running, lambda: e.num_running)
        m.bind(m.queued, lambda: e.num_queued)
        m.bind(m.used_tokens, lambda: e.used_tokens)
        m.bind(m.token_usage, lambda: e.used_tokens / self.capacity_tokens)
        m.bind(m.max_total_tokens, lambda: self.capacity_tokens)
        m.bind(m.cache_hit_rate, lambda: e.cache_hit_rate)
        m.bind(m.gen_throughput, e.gen_throughput)
        m.bind(m.decode_sum_seq_lens, lambda: e.decode_sum_seq_lens)
        m.bind(m.prealloc_queue, lambda: e.awaiting_memory)
        m.bind(m.transfer_queue, lambda: e.awaiting_kv)

    def _on_finish(self, job: Job) -> None:
        if job.finish_reason and job.finish_reason.get("type") != "abort":
            generated = len(job.output_ids) if job.kind != "prefill" else 0
            self.metrics.count_tokens(len(job.prompt), generated)

    # ---- entry -----------------------------------------------------------------------------------------------------
    def submit(self, req: GenerateRequest, arrival: float) -> Job:
        """Check the request fits this server's mode, create its Job and start its flow."""
        if req.rid in self.engine.jobs:
            raise RequestError(f"Duplicate request ID {req.rid!r}")
        if self.role == "colocated":
            kind, flow = "colocated", self._local_flow
        elif self.role == "decode":
            if req.is_local_append:
                kind, flow = "local", self._local_flow
            elif req.has_bootstrap:
                kind, flow = "pd_decode", self._pd_decode_flow
                if req.bootstrap_room in self.pending_kv:
                    raise RequestError(f"bootstrap_room {req.bootstrap_room} is already waiting for its KV")
            else:
                raise RequestError(
                    "Disaggregated decode server requires bootstrap_room (or bootstrap_host = ppd-local-append)"
                )
        else:
            if req.is_local_append:
                raise RequestError("a local append goes to a decode server, not to a prefill server")
            if not req.has_bootstrap or not req.bootstrap_host or req.bootstrap_port is None:
                raise RequestError(
                    "Disaggregated prefill server requires bootstrap_host, bootstrap_port, bootstrap_room"
                )
            kind, flow = "prefill", self._pd_prefill_flow
        need = self.engine.need_tokens(len(req.input_ids), req.sampling.max_new_tokens)
        if need > self.capacity_tokens:
            raise RequestError(
                f"The request needs {need} KV tokens, more than this server's KV pool ({self.capacity_tokens})."
            )
        s = req.sampling
        job = Job(
            rid=req.rid,
            kind=kind,  # type: ignore[arg-type]
            prompt=req.input_ids,
            max_new_tokens=max(1, s.max_new_tokens) if kind == "prefill" else s.max_new_tokens,
            stop_token_ids=s.stop_token_ids,
            min_new_tokens=s.min_new_tokens,
            arrival=arrival,
            quiet=kind == "prefill",
        )
        self.engine.jobs[job.rid] = job
        job.salt = kvdata.sampling_salt(s.temperature, s.top_p, s.top_k, s.min_p, self._seed(s.seed))
        task = asyncio.get_running_loop().create_task(self._guard(job, flow(job, req)))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return job

    def _seed(self, seed: int | None) -> int:
        return self.cfg.emulator.seed if seed is None else seed

    async def _guard(self, job: Job, flow) -> None:
        try:
            await flow
        except asyncio.CancelledError:
            self.engine.finish(job, finish_abort("server shutting down", 503))
            raise
        except CapacityError as err:
            self.engine.finish(job, finish_abort(str(err), 400))
        except Exception as err:  # a failed flow ends its request, never the server
            log.exception("request %s failed", job.rid)
            self.engine.finish(job, finish_abort(f"{type(err).__name__}: {err}", 500))

    async def _host_overhead(self, job: Job) -> None:
        """HTTP + tokenizer-manager + scheduler hops before the request reaches the GPU (roofline.request_overhead_s)."""
        end = job.arrival + roofline.request_overhead_s(len(job.prompt), self.eff) * self.time_scale
        delay = end - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)

    def _local_kv(self, prompt: tuple[int, ...]) -> np.ndarray:
        return kvdata.kv_rows(np.asarray(prompt, dtype=np.int64), self.wire_bytes_per_token, self.kv_seed)

    def _plan(self, job: Job, digest: int, first: int = 0) -> np.ndarray:
        last = 1 if job.kind == "prefill" else max(1, job.max_new_tokens)
        steps = np.arange(first, last, dtype=np.int64)
        return kvdata.output_ids(digest, steps, job.salt, self.allowed_ids)

    # ---- colocated / D-route -------------------------------------------------------------------------------------
    async def _local_flow(self, job: Job, req: GenerateRequest) -> None:

        def compute() -> np.ndarray:
            rows = self._local_kv(job.prompt)
            return self._plan(job, kvdata.request_digest(kvdata.token_digests(rows)))

        _, job.planned = await asyncio.gather(self._host_overhead(job), asyncio.to_thread(compute))
        if job.finished:
            return
        await self.engine.reserve(job)
        if not job.finished:
            self.engine.enqueue_prefill(job)

    # ---- PD prefill ------------------------------------------------------------------------------------------------
    def _room_future(self, room: int) -> asyncio.Future:
        now = time.monotonic()
        for r, (t, fut) in list(self.rooms.items()):  # registrations nobody claimed expire
            if now - t > self.cfg.emulator.waiting_timeout_s:
                fut.cancel()
                del self.rooms[r]
        if room not in self.rooms:
            self.rooms[room] = (now, asyncio.get_running_loop().create_future())
        return self.rooms[room][1]

    def register_room(self, reg: RoomRegistration) -> None:
        """Bootstrap server: a decode server says where room `reg.room`'s KV goes."""
        fut = self._room_future(reg.room)
        if fut.done():
            raise RequestError(f"bootstrap_room {reg.room} is already registered")
        fut.set_result(reg)

    async def _pd_prefill_flow(self, job: Job, req: GenerateRequest) -> None:
        room = int(req.bootstrap_room)  # type: ignore[arg-type]

        def compute() -> tuple[np.ndarray, int]:
            rows = self._local_kv(job.prompt)
            return rows.reshape(-1), kvdata.request_digest(kvdata.token_digests(rows))

        _, (kv, digest) = await asyncio.gather(self._host_overhead(job), asyncio.to_thread(compute))
        job.planned = self._plan(job, digest)
        fut = self._room_future(room)
        try:
            reg: RoomRegistration = await asyncio.wait_for(
                asyncio.shield(fut), timeout=max(0.0, job.arrival + self.cfg.emulator.waiting_timeout_s - self._now())
            )
        except asyncio.TimeoutError:
            elapsed = self._now() - job.arrival
            self.rooms.pop(room, None)
            self.engine.finish(
                job, finish_abort(f"Request {room} timed out after {elapsed:.1f}s in KVPoll.Bootstrapping", 500)
            )
            return
        finally:
            if fut.done():
                self.rooms.pop(room, None)
        if job.finished:  # aborted while bootstrapping
            await self._send_aux(reg, KVAux(room=room, error="prefill request aborted"))
            return
        if reg.nbytes != kv.nbytes or reg.prompt_tokens != len(job.prompt):
            msg = f"KV size mismatch for room {room}: prefill has {len(job.prompt)} tokens ({kv.nbytes} bytes), decode expects {reg.prompt_tokens} ({reg.nbytes} bytes)"
            await self._send_aux(reg, KVAux(room=room, error=msg))
            self.engine.finish(job, finish_abort(msg, 500))
            return
        await self.engine.reserve(job)
        if job.finished:
            await self._send_aux(reg, KVAux(room=room, error="prefill request aborted"))
            return
        self.engine.enqueue_prefill(job)
        await job.prefill_done.wait()
        if job.finished:
            await self._send_aux(reg, KVAux(room=room, error="prefill request aborted"))
            return
        loop_t0 = self._now()
        sent = kv
        if flip_in_transit():
            sent = kv.copy()
            sent[sent.size // 2] ^= 0xFF
        try:
            wire_s = await self.transfer.write(sent, RemoteBuffer(reg.session, reg.ptr, reg.nbytes))  # type: ignore[union-attr]
        except TransferError as err:
            await self._send_aux(reg, KVAux(room=room, error=str(err)))
            self.engine.finish(job, finish_abort(f"Prefill transfer failed for room {room}: {err}", 500))
            return
        self.metrics.count_transfer("send", sent.nbytes, wire_s)
        # the move takes the longer of the real write and the link model for the real KV size; the decode side
        # lands the KV at that instant (one host, one monotonic clock), its own aux handling hidden inside it
        model_s = roofline.transfer_time_s(self.link, roofline.kv_bytes(self.model, len(job.prompt))) * self.time_scale
        job.transfer_s = max(wire_s, model_s)
        job.wire_bytes = sent.nbytes
        aux = KVAux(
            room=room,
            first_token=int(job.planned[0]),
            checksum=f"{digest:016x}",
            nbytes=sent.nbytes,
            wire_s=wire_s,
            transfer_s=job.transfer_s,
            land_at=loop_t0 + job.transfer_s,
            prefill=self.timings(job),
        )
        if not await self._send_aux(reg, aux):
            self.engine.finish(job, finish_abort(f"could not deliver the KV aux data of room {room}", 500))
            return
        await asyncio.sleep(max(0.0, loop_t0 + job.transfer_s - self._now()))
        self.engine.release_transferred(job)
        self.engine.finish(job, finish_length(0))

    async def _send_aux(self, reg: RoomRegistration, aux: KVAux) -> bool:
        try:
            resp = await self.http.post(reg.aux_url, json=aux.model_dump())  # type: ignore[union-attr]
            return resp.status_code == 200
        except httpx.HTTPError as err:
            log.warning("aux for room %s to %s failed: %s", aux.room, reg.aux_url, err)
            return False

    # ---- PD decode -------------------------------------------------------------------------------------------------
    async def _pd_decode_flow(self, job: Job, req: GenerateRequest) -> None:
        room = int(req.bootstrap_room)  # type: ignore[arg-type]
        deadline = job.arrival + self.cfg.emulator.waiting_timeout_s
        await self._host_overhead(job)
        await self.engine.reserve(job)
        if job.finished:
            return
        nbytes = self.wire_bytes_per_token * len(job.prompt)
        buf, ptr = self.transfer.alloc_receive(nbytes)  # type: ignore[union-attr]
        pending = PendingKV(buf, ptr, asyncio.get_running_loop().create_future())
        self.pending_kv[room] = pending
        self.engine.awaiting_kv += 1
        try:
            reg = RoomRegistration(
                room=room,
                session=self.transfer.session,  # type: ignore[union-attr]
                ptr=ptr,
                nbytes=nbytes,
                aux_url=f"http://{self.server.host}:{self.server.port}/ppd/kv_aux",
                prompt_tokens=len(job.prompt),
            )
            aux = await self._register_and_wait(job, req, reg, pending, deadline)
        finally:
            self.engine.awaiting_kv -= 1
            self.pending_kv.pop(room, None)
            self.transfer.unregister(ptr)  # type: ignore[union-attr]
        if aux is None or job.finished:
            return
        if aux.error:
            self.engine.finish(job, finish_abort(f"Decode transfer failed for room {room}: {aux.error}", 500))
            return
        digest = await asyncio.to_thread(kvdata.digest_of_buffer, buf, self.wire_bytes_per_token)
        if f"{digest:016x}" != aux.checksum:  # the digest of the KV held is the integrity check
            self.metrics.count_integrity_error()
            job.integrity_ok = False
            log.warning("room %s: KV digest mismatch (received bytes differ from the sender's)", room)
        self.metrics.count_transfer("recv", aux.nbytes, aux.wire_s)
        job.aux = aux
        now = self._now()
        land_at = aux.land_at if now - 1.0 < aux.land_at < now + aux.transfer_s + 1.0 else now  # sanity: same clock
        await asyncio.sleep(max(0.0, land_at - now))
        job.planned = np.concatenate([[aux.first_token], self._plan(job, digest, first=1)]).astype(np.int64)
        self.engine.enqueue_landed(job, len(job.prompt))

    async def _register_and_wait(
        self, job: Job, req: GenerateRequest, reg: RoomRegistration, pending: PendingKV, deadline: float
    ) -> KVAux | None:
        url = f"http://{req.bootstrap_host}:{req.bootstrap_port}/ppd/rooms/{reg.room}"
        registered = False
        while not registered and not job.finished and self._now() < deadline:
            try:
                resp = await self.http.put(url, json=reg.model_dump())  # type: ignore[union-attr]
                if resp.status_code == 200:
                    registered = True
                    break
                if 400 <= resp.status_code < 500:
                    self.engine.finish(job, finish_abort(f"bootstrap server refused room {reg.room}: {resp.text}", 500))
                    return None
            except httpx.HTTPError:
                pass  # prefill bootstrap server not up (yet): SGLang retries too
            await asyncio.sleep(0.05)
        if job.finished:
            return None
        if registered:
            aborted = asyncio.ensure_future(job.done.wait())
            try:  # the aux, an abort of this request, or the waiting timeout, whichever comes first
                await asyncio.wait(
                    {pending.aux, aborted},
                    timeout=max(0.0, deadline - self._now()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                aborted.cancel()
            if job.finished:
                return None
            if pending.aux.done():
                return pending.aux.result()
        elapsed = self._now() - job.arrival
        self.engine.finish(
            job, finish_abort(f"Request {reg.room} timed out after {elapsed:.1f}s in KVPoll.WaitingForInput", 500)
        )
        return None

    def deliver_aux(self, aux: KVAux) -> bool:
        pending = self.pending_kv.get(aux.room)
        if pending is None or pending.aux.done():
            return False
        pending.aux.set_result(aux)
        return True

    # ---- reporting -------------------------------------------------------------------------------------------------
    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _ms(self, a: float | None, b: float | None) -> float | None:
        if a is None or b is None:
            return None
        return round((b - a) * 1e3 / self.time_scale, 3)

    def timings(self, job: Job) -> dict:
        """meta_info.ppd: this server's timings in emulated-GPU ms (wall ms / time_scale)."""
        aux: KVAux | None = job.aux
        out = {
            "route": {"colocated": "colocated", "local": "decode", "prefill": "prefill", "pd_decode": "prefill"}[
                job.kind
            ],
            "server_role": self.role,
            "gpu": self.gpu.name,
            "time_scale": self.time_scale,
            "overhead_ms": self._ms(job.arrival, job.t_ready),
            "queue_ms": self._ms(job.t_ready, job.t_prefill_start),
            "prefill_ms": self._ms(job.t_prefill_start, job.t_prefill_end),
            "transfer_ms": None,
            "ttft_ms": self._ms(job.arrival, job.t_first_token),
            "kv_bytes": roofline.kv_bytes(self.model, len(job.prompt)),
            "kv_bytes_wire": 0,
            "cached_tokens": job.cached_tokens,
        }
        for key, unix in (("arrival_unix_s", job.arrival_unix), ("first_chunk_unix_s", job.first_chunk_unix)):
            if unix is not None:
                out[key] = round(unix, 6)
        if job.kind == "prefill":
            t = job.transfer_s
            out["transfer_ms"] = None if t is None else round(t * 1e3 / self.time_scale, 3)
            out["kv_bytes_wire"] = job.wire_bytes
        if aux is not None:
            pre = aux.prefill
            out.update(
                queue_ms=pre.get("queue_ms"),
                prefill_ms=pre.get("prefill_ms"),
                prefill_overhead_ms=pre.get("overhead_ms"),
                transfer_ms=round(aux.transfer_s * 1e3 / self.time_scale, 3),
                kv_bytes_wire=aux.nbytes,
                cached_tokens=pre.get("cached_tokens", 0),
                prefill_cached_tokens=pre.get("cached_tokens", 0),
                kv_integrity_ok=job.integrity_ok,
            )
        return out

    def meta_info(self, job: Job, with_timings: bool = True) -> dict:
        meta = {
            "id": job.rid,
            "finish_reason": job.finish_reason,
            "prompt_tokens": len(job.prompt),
            "weight_version": "default",
            "total_retractions": 0,
            "reasoning_tokens": 0,
            "completion_tokens": len(job.output_ids),
            "cached_tokens": job.cached_tokens,
        }
        if with_timings:
            meta["ppd"] = self.timings(job)
        if job.t_finish is not None:
            meta["e2e_latency"] = round(job.t_finish - job.arrival, 6)
        return meta

    def output(self, job: Job) -> dict:
        """The /generate response (and a stream chunk): SGLang's shape plus meta_info.ppd."""
        return {"text": "", "output_ids": list(job.output_ids), "meta_info": self.meta_info(job)}

    # ---- info endpoints --------------------------------------------------------------------------------------------
    def server_info(self) -> dict:
        em = self.cfg.emulator
        mode = {"prefill": "prefill", "decode": "decode", "colocated": "null"}[self.role]
        return {
            "model_path": self.cfg.model.path,
            "tokenizer_path": self.cfg.model.tokenizer,
            "served_model_name": self.cfg.model.served_name,
            "host": self.server.host,
            "port": self.server.port,
            "skip_tokenizer_init": True,
            "context_length": self.cfg.model.context_length,
            "chunked_prefill_size": em.chunk_size,
            "max_running_requests": em.max_running_requests,
            "mem_fraction_static": em.mem_fraction_static,
            "page_size": 1,
            "disable_radix_cache": False,
            "disaggregation_mode": mode,
            "disaggregation_transfer_backend": "mooncake",
            "disaggregation_bootstrap_port": self.server.bootstrap_port,
            "max_total_num_tokens": self.capacity_tokens,
            "internal_states": [
                {
                    "num_running_reqs": self.engine.num_running,
                    "num_queue_reqs": self.engine.num_queued,
                    "num_used_tokens": self.engine.used_tokens,
                    "cached_tokens": len(self.engine.cache),
                }
            ],
            "version": SGLANG_VERSION,
            "ppd_emulator": {
                "role": self.role,
                "index": self.index,
                "gpu": self.gpu.name,
                "model": self.model.name,
                "time_scale": self.time_scale,
                "kv_bytes_scale": em.kv_bytes_scale,
                "kv_bytes_per_token": self.model.kv_bytes_per_token,
                "kv_wire_bytes_per_token": self.wire_bytes_per_token,
                "link": {
                    "kind": self.link.name,
                    "gbytes_per_s": self.link.gbytes_per_s,
                    "latency_ms": self.link.latency_ms,
                },
                "mooncake_session": self.transfer.session if self.transfer else None,
                "waiting_timeout_s": em.waiting_timeout_s,
                "iterations": dict(self.engine.iterations),
            },
        }

    def model_info(self) -> dict:
        hf: dict = {}
        path = resolve_path(self.cfg.model.path) / "config.json"
        if path.exists():
            try:
                hf = json.loads(path.read_text())
            except (OSError, ValueError):
                hf = {}
        return {
            "model_path": self.cfg.model.path,
            "tokenizer_path": self.cfg.model.tokenizer,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": hf.get("model_type"),
            "architectures": hf.get("architectures"),
        }
