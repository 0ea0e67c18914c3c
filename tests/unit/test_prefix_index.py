"""PrefixIndex: the router's per-server radix tree over token ids (longest match, LRU leaf eviction, bound, locks)."""

from __future__ import annotations

import random

from ppd.prefix_index import PrefixIndex


def test_longest_prefix_match():
    idx = PrefixIndex()
    assert idx.insert([1, 2, 3, 4]) == 4
    assert idx.match([1, 2, 3, 4, 5]) == 4
    assert idx.match([1, 2, 9]) == 2
    assert idx.match([9]) == 0 and idx.match([]) == 0
    assert idx.insert([1, 2, 7, 8]) == 2  # shares [1, 2]: the edge splits, only the tail is new
    assert len(idx) == 6
    assert idx.match([1, 2, 7, 8, 9]) == 4 and idx.match([1, 2, 3]) == 3


def test_reinsert_counts_nothing_new():
    idx = PrefixIndex()
    idx.insert([5, 6, 7])
    assert idx.insert([5, 6, 7]) == 0 and idx.insert([5, 6]) == 0
    assert len(idx) == 3


def test_bounded_with_lru_eviction():
    idx = PrefixIndex(capacity_tokens=10)
    idx.insert([1] * 4)  # A
    idx.insert([2] * 4)  # B
    idx.match([1] * 4)  # A is now the most recently used
    idx.insert([3] * 4)  # over capacity: B (least recently used) goes
    assert len(idx) <= 10
    assert idx.match([2] * 4) == 0
    assert idx.match([1] * 4) == 4 and idx.match([3] * 4) == 4


def test_eviction_takes_leaves_first_and_keeps_shared_prefixes():
    idx = PrefixIndex(capacity_tokens=0)
    idx.insert([1, 2, 3, 10, 11])
    idx.insert([1, 2, 3, 20, 21])
    freed = idx.evict(2)
    assert freed == 2
    assert idx.match([1, 2, 3]) == 3  # the shared trunk stays while a branch is left


def test_locked_paths_survive_eviction():
    idx = PrefixIndex(capacity_tokens=0)
    idx.insert([1, 1, 1])
    idx.insert([2, 2, 2])
    idx.lock([1, 1, 1])
    idx.evict(100)
    assert idx.match([1, 1, 1]) == 3 and idx.match([2, 2, 2]) == 0
    idx.lock([1, 1, 1], delta=-1)
    idx.evict(100)
    assert len(idx) == 0


def test_total_tokens_matches_a_brute_force_model():
    """Random conversations: the tree's token count equals the number of distinct prefixes it holds."""
    rng = random.Random(0)
    idx = PrefixIndex()
    held: set[tuple[int, ...]] = set()
    bases = [[rng.randrange(5) for _ in range(rng.randrange(1, 12))] for _ in range(6)]
    for _ in range(200):
        seq = rng.choice(bases) + [rng.randrange(5) for _ in range(rng.randrange(0, 6))]
        idx.insert(seq)
        held.update(tuple(seq[:k]) for k in range(1, len(seq) + 1))
        probe = rng.choice(bases) + [rng.randrange(5) for _ in range(3)]
        want = max((k for k in range(len(probe) + 1) if tuple(probe[:k]) in held or k == 0), default=0)
        assert idx.match(probe, touch=False) == want
    assert len(idx) == len(held)


def test_clear():
    idx = PrefixIndex(100)
    idx.insert([1, 2, 3])
    idx.clear()
    assert len(idx) == 0 and idx.match([1, 2, 3]) == 0
