"""The emulated model's "KV cache" and "sampler": pure numpy functions of token ids and positions.

Every token at position p with id t owns `bytes_per_token` bytes of KV (the real KV size divided by
`emulator.kv_bytes_scale`), a deterministic function of (t, p, kv_seed) (splitmix64). A server derives its output tokens
from the KV bytes it holds: one 64-bit digest per token row, folded into one request digest, mixed with the decode step
and the sampling salt. So the same prompt gives the same tokens on any route, and a corrupted, partial or missing KV
transfer gives different tokens. The request digest doubles as the transfer's integrity check: the prefill side sends
the digest of what it computed, the decode side compares it with the digest of what it received.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_TOKEN_MUL = np.uint64(0xD6E8FEB86659FD93)
_POS_MUL = np.uint64(0xA0761D6478BD642F)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorized splitmix64 finalizer (uint64 in, uint64 out; wraps modulo 2^64)."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def seed64(*parts: object) -> int:
    """A 64-bit seed from any printable parts (model name, config seed, sampling parameters)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return struct.unpack("<Q", digest)[0]


def kv_rows(
    token_ids: Sequence[int] | np.ndarray, bytes_per_token: int, kv_seed: int, start_pos: int = 0
) -> np.ndarray:
    """KV bytes of `token_ids` at positions start_pos.. : uint8 array (tokens, bytes_per_token), C-contiguous."""
    ids = np.asarray(token_ids, dtype=np.uint64)
    n = ids.shape[0]
    words = -(-bytes_per_token // 8)
    pos = np.arange(start_pos, start_pos + n, dtype=np.uint64)
    base = splitmix64(ids * _TOKEN_MUL ^ pos * _POS_MUL ^ np.uint64(kv_seed))
    lanes = np.arange(words, dtype=np.uint64) * _GOLDEN
    block = splitmix64(base[:, None] + lanes[None, :])
    rows = block.view(np.uint8).reshape(n, words * 8)
    return np.ascontiguousarray(rows[:, :bytes_per_token])


def token_digests(rows: np.ndarray) -> np.ndarray:
    """One uint64 per token row (tokens, bytes): every byte of the row changes it."""
    n, width = rows.shape
    words = -(-width // 8)
    if width != words * 8:
        padded = np.zeros((n, words * 8), dtype=np.uint8)
        padded[:, :width] = rows
        rows = padded
    cols = np.ascontiguousarray(rows).view(np.uint64).reshape(n, words)
    lanes = np.arange(1, words + 1, dtype=np.uint64) * _POS_MUL
    return splitmix64(splitmix64(cols ^ lanes[None, :]).sum(axis=1, dtype=np.uint64))


def request_digest(digests: np.ndarray) -> int:
    """Fold per-token digests (in position order) into one request digest."""
    if digests.size == 0:
        return 0
    pos = np.arange(digests.size, dtype=np.uint64) * _GOLDEN
    return int(np.bitwise_xor.reduce(splitmix64(digests ^ pos)))


def digest_of_buffer(buf: np.ndarray, bytes_per_token: int) -> int:
    """Request digest of a flat KV buffer (what a decode server received)."""
    return request_digest(token_digests(buf.reshape(-1, bytes_per_token)))


def sampling_salt(temperature: float, top_p: float, top_k: int, min_p: float, seed: int) -> int:
    """0 for greedy decoding (output depends on the KV alone); else a function of the sampling parameters and seed."""
    if temperature <= 0.0 or top_k == 1:
        return 0
    return seed64("sample", float(temperature), float(top_p), int(top_k), float(min_p), int(seed))


def output_ids(digest: int, steps: Iterable[int] | np.ndarray, salt: int, allowed_ids: np.ndarray) -> np.ndarray:
    """Token id generated at each decode step (0 = the prefill's first token), drawn from `allowed_ids`."""
    s = np.asarray(steps, dtype=np.uint64)
    h = splitmix64(splitmix64(s ^ np.uint64(salt)) ^ np.uint64(digest))
    return allowed_ids[(h % np.uint64(allowed_ids.size)).astype(np.int64)]
