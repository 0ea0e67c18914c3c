"""KV bytes over Mooncake's TransferEngine (TCP transport, P2P handshake), as SGLang's mooncake backend moves them.

One engine per server process. The decode side registers a receive buffer per bootstrap room and tells the prefill
side where it lives (session + address); the prefill side registers its send buffer and writes into the peer's
buffer with `transfer_sync_write` (blocking, so it runs in a worker thread: the engine releases the GIL).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# Test-only: flip one byte of every KV buffer after its checksum is taken, i.e. corrupt it "in transit".
FLIP_ENV = "PPD_EMULATOR_FLIP_KV_BYTE"


def flip_in_transit() -> bool:
    return os.environ.get(FLIP_ENV, "") not in ("", "0", "false", "False")


class TransferError(RuntimeError):
    pass


@dataclass(frozen=True)
class RemoteBuffer:
    """Where a decode server wants a room's KV written."""

    session: str  # "host:rpc_port" of the peer's TransferEngine
    ptr: int
    nbytes: int


class KVTransfer:
    """One Mooncake TransferEngine for this process."""

    def __init__(self, host: str = "127.0.0.1"):
        from mooncake.engine import TransferEngine  # imported here: colocated servers never need it

        self._engine = TransferEngine()
        ret = self._engine.initialize(host, "P2PHANDSHAKE", "tcp", "")
        if ret != 0:
            raise TransferError(f"Mooncake TransferEngine.initialize({host!r}, P2PHANDSHAKE, tcp) returned {ret}")
        self.host = host
        self.rpc_port = self._engine.get_rpc_port()
        # registered buffers stay referenced here until unregistered (the engine holds raw pointers)
        self._buffers: dict[int, np.ndarray] = {}

    @property
    def session(self) -> str:
        return f"{self.host}:{self.rpc_port}"

    def register(self, buf: np.ndarray) -> int:
        if not buf.flags["C_CONTIGUOUS"]:
            raise TransferError("KV buffers must be contiguous")
        ptr = buf.ctypes.data
        ret = self._engine.register_memory(ptr, buf.nbytes)
        if ret != 0:
            raise TransferError(f"register_memory({buf.nbytes} bytes) returned {ret}")
        self._buffers[ptr] = buf
        return ptr

    def unregister(self, ptr: int) -> None:
        if self._buffers.pop(ptr, None) is not None:
            self._engine.unregister_memory(ptr)

    def alloc_receive(self, nbytes: int) -> tuple[np.ndarray, int]:
        """A registered, zeroed receive buffer (zeros: a transfer that never lands leaves no valid KV)."""
        buf = np.zeros(max(1, nbytes), dtype=np.uint8)
        return buf, self.register(buf)

    async def write(self, src: np.ndarray, dst: RemoteBuffer) -> float:
        """Write all of `src` into the peer's buffer; returns the measured wall seconds of the write."""
        if src.nbytes != dst.nbytes:
            raise TransferError(f"KV size mismatch: sending {src.nbytes} bytes into a {dst.nbytes}-byte buffer")
        ptr = self.register(src)
        try:
            t0 = time.perf_counter()
            ret = await asyncio.to_thread(self._engine.transfer_sync_write, dst.session, ptr, dst.ptr, src.nbytes)
            elapsed = time.perf_counter() - t0
        finally:
            self.unregister(ptr)
        if ret != 0:
            raise TransferError(f"transfer_sync_write to {dst.session} returned {ret}")
        return elapsed

    def close(self) -> None:
        for ptr in list(self._buffers):
            self.unregister(ptr)
