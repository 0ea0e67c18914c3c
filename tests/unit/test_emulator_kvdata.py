"""The emulated KV bytes and the tokens derived from them."""

from __future__ import annotations

import numpy as np

from ppd.emulator import kvdata

SEED = kvdata.seed64("kv", "llama-3-8b", 0)
ALLOWED = np.arange(5, 8192, dtype=np.int64)


def test_rows_are_a_function_of_token_and_position():
    ids = np.array([11, 22, 33, 44, 11], dtype=np.int64)
    rows = kvdata.kv_rows(ids, 128, SEED)
    assert rows.shape == (5, 128) and rows.dtype == np.uint8 and rows.flags["C_CONTIGUOUS"]
    assert np.array_equal(rows, kvdata.kv_rows(ids, 128, SEED))
    assert not np.array_equal(rows[0], rows[4])  # same token, other position
    # computing a suffix on its own (an append over a cached prefix) gives the same bytes
    assert np.array_equal(kvdata.kv_rows(ids[2:], 128, SEED, start_pos=2), rows[2:])
    assert not np.array_equal(kvdata.kv_rows(ids, 128, SEED + 1), rows)
    # sizes that are not a multiple of 8 bytes
    assert kvdata.kv_rows(ids, 13, SEED).shape == (5, 13)


def test_any_flipped_byte_changes_the_request_digest():
    ids = np.arange(1000, 1300, dtype=np.int64)
    rows = kvdata.kv_rows(ids, 128, SEED)
    base = kvdata.request_digest(kvdata.token_digests(rows))
    assert base == kvdata.digest_of_buffer(rows.reshape(-1).copy(), 128)
    rng = np.random.default_rng(0)
    for _ in range(20):
        bad = rows.copy()
        bad[rng.integers(0, 300), rng.integers(0, 128)] ^= np.uint8(1 << rng.integers(0, 8))
        assert kvdata.request_digest(kvdata.token_digests(bad)) != base
    partial = rows.copy()
    partial[150:] = 0  # a transfer that stopped half way
    assert kvdata.request_digest(kvdata.token_digests(partial)) != base
    swapped = rows[[1, 0, *range(2, 300)]]
    assert kvdata.request_digest(kvdata.token_digests(swapped)) != base


def test_output_ids_are_deterministic_and_never_special():
    out = kvdata.output_ids(12345, range(2000), 0, ALLOWED)
    assert np.array_equal(out, kvdata.output_ids(12345, range(2000), 0, ALLOWED))
    assert out.min() >= 5 and out.max() < 8192
    assert len(set(out.tolist())) > 1500  # spread over the vocabulary
    assert not np.array_equal(out, kvdata.output_ids(12346, range(2000), 0, ALLOWED))
    # step s does not depend on how many steps are asked for (decode produces one at a time)
    assert np.array_equal(kvdata.output_ids(12345, range(5, 10), 0, ALLOWED), out[5:10])


def test_sampling_salt():
    assert kvdata.sampling_salt(0.0, 0.9, 50, 0.0, seed=1) == 0  # greedy: only the KV matters
    assert kvdata.sampling_salt(1.0, 1.0, 1, 0.0, seed=1) == 0  # top_k=1 is greedy too
    a = kvdata.sampling_salt(0.7, 0.9, -1, 0.0, seed=1)
    assert a == kvdata.sampling_salt(0.7, 0.9, -1, 0.0, seed=1)
    assert a != kvdata.sampling_salt(0.7, 0.9, -1, 0.0, seed=2)
    assert a != kvdata.sampling_salt(0.8, 0.9, -1, 0.0, seed=1)
