"""A server's KV memory in the simulator: a bounded pool holding in-flight requests' KV and a radix cache.

The radix cache works on *segments* (a shared document, one turn's user message, one answer) instead of token ids:
the simulator knows lengths, not tokens, and a conversation's prompt is a chain of segments, so matching, locking and
LRU eviction of leaves behave like SGLang's RadixCache at segment granularity, at a cost independent of length.

Accounting (tokens): used = active (private KV of requests being served) + cached (tree nodes). A request reserves
its private tokens before it starts (FIFO; the head waits until enough is free after evicting unlocked leaves) and
locks the cached path it reuses, so that path cannot be evicted under it. When it finishes its KV goes into the tree.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import simpy

Segment = tuple[Hashable, int]  # (key, tokens)


@dataclass(eq=False)
class _Node:
    key: Hashable = None
    tokens: int = 0
    parent: _Node | None = None
    children: dict[Hashable, _Node] = field(default_factory=dict)
    last_access: int = 0
    lock_ref: int = 0


class SegmentTree:
    """Radix tree over segment chains with LRU leaf eviction (no capacity of its own: the pool bounds it).

    Evictable leaves sit in a lazy heap keyed by last access: entries are pushed whenever a node becomes an unlocked
    leaf or is touched, and checked when popped, so eviction costs O(log n) per node instead of a tree walk.
    """

    def __init__(self) -> None:
        self._root = _Node()
        self._clock = itertools.count(1)
        self._seq = itertools.count()
        self._heap: list[tuple[int, int, _Node]] = []
        self.nodes = 0
        self.total_tokens = 0
        self.locked_tokens = 0  # tokens of nodes with lock_ref > 0 (locking a path locks every ancestor)

    def _candidate(self, node: _Node) -> None:
        if not node.children and node.lock_ref == 0 and node is not self._root and node.parent is not None:
            heapq.heappush(self._heap, (node.last_access, next(self._seq), node))
            if len(self._heap) > 4 * self.nodes + 64:  # too many stale entries: rebuild
                self._heap = [e for e in self._heap if self._valid(e)]
                heapq.heapify(self._heap)

    def _valid(self, entry: tuple[int, int, _Node]) -> bool:
        access, _, node = entry
        return (
            node.parent is not None
            and not node.children
            and node.lock_ref == 0
            and node.last_access == access
            and node.parent.children.get(node.key) is node
        )

    def match(self, segs: Sequence[Segment], touch: bool = False) -> tuple[int, list[_Node]]:
        """Tokens of the longest cached prefix of `segs`, and the nodes on it."""
        node, matched, path = self._root, 0, []
        for key, _ in segs:
            child = node.children.get(key)
            if child is None:
                break
            path.append(child)
            matched += child.tokens
            node = child
        if touch and path:
            now = next(self._clock)
            for n in path:
                n.last_access = now
            self._candidate(path[-1])
        return matched, path

    def insert(self, segs: Sequence[Segment]) -> int:
        """Hold the chain `segs`; returns how many tokens were new."""
        node, added, now = self._root, 0, next(self._clock)
        for key, tokens in segs:
            child = node.children.get(key)
            if child is None:
                child = _Node(key, tokens, node, last_access=now)
                node.children[key] = child
                added += tokens
                self.nodes += 1
            child.last_access = now
            node = child
        self.total_tokens += added
        if node is not self._root:
            self._candidate(node)
        return added

    def lock(self, path: Sequence[_Node], delta: int) -> None:
        for node in path:
            before = node.lock_ref
            node.lock_ref = max(0, before + delta)
            if before == 0 and node.lock_ref > 0:
                self.locked_tokens += node.tokens
            elif before > 0 and node.lock_ref == 0:
                self.locked_tokens -= node.tokens
                self._candidate(node)

    @property
    def evictable_tokens(self) -> int:
        return self.total_tokens - self.locked_tokens

    def evict(self, num_tokens: int) -> int:
        """Drop least recently used unlocked leaves until `num_tokens` are freed (or nothing is left to drop)."""
        freed = 0
        while freed < num_tokens and self._heap:
            entry = heapq.heappop(self._heap)
            if not self._valid(entry):
                continue
            leaf = entry[2]
            parent = leaf.parent
            del parent.children[leaf.key]
            leaf.parent = None
            self.nodes -= 1
            freed += leaf.tokens
            if parent is not self._root:
                self._candidate(parent)
        self.total_tokens -= freed
        return freed


class KvPool:
    """KV memory of one server, in tokens, with FIFO admission and time-weighted usage statistics."""

    def __init__(self, env: simpy.Environment, capacity_tokens: int):
        self.env = env
        self.capacity_tokens = capacity_tokens
        self.tree = SegmentTree()
        self.active_tokens = 0
        self._waiters: deque[tuple[int, simpy.Event]] = deque()
        # statistics
        self.peak_used = 0
        self.peak_active = 0
        self.evicted_tokens = 0
        self._area_used = 0.0
        self._area_active = 0.0
        self._last_t = env.now

    @property
    def used_tokens(self) -> int:
        return self.active_tokens + self.tree.total_tokens

    @property
    def free_tokens(self) -> int:
        return self.capacity_tokens - self.used_tokens

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def match(self, segs: Sequence[Segment]) -> int:
        return self.tree.match(segs)[0]

    def lock_prefix(self, segs: Sequence[Segment], limit_tokens: int) -> tuple[int, list[_Node]]:
        """Lock the cached prefix of `segs` (at most `limit_tokens` of it, whole segments) for a request's use."""
        _, path = self.tree.match(segs, touch=True)
        used, keep = 0, []
        for node in path:
            if used + node.tokens > limit_tokens:
                break
            used += node.tokens
            keep.append(node)
        self.tree.lock(keep, +1)
        return used, keep

    def unlock(self, path: Sequence[_Node]) -> None:
        self.tree.lock(path, -1)
        self._grant()

    def commit(self, segs: Sequence[Segment], path: Sequence[_Node], private_tokens: int) -> list[_Node]:
        """A prefill finished: its `private_tokens` of prompt KV go into the cache (a copy another request inserted
        meanwhile is freed, as SGLang does), locked while the request runs. Returns the new locked path."""
        self._note()
        self.tree.insert(segs)
        _, new_path = self.tree.match(segs)
        self.tree.lock(new_path, +1)
        self.tree.lock(path, -1)
        self.active_tokens -= private_tokens
        self._note()
        self._grant()
        return new_path

    def reserve(self, tokens: int) -> simpy.Event | None:
        """An event that fires once `tokens` of private KV are reserved (FIFO); None if they can never fit."""
        if tokens > self.capacity_tokens:
            return None
        ev = self.env.event()
        self._waiters.append((tokens, ev))
        self._grant()
        return ev

    def release(self, tokens: int, insert: Sequence[Segment] = ()) -> None:
        """Give back `tokens` of private KV, after putting the chain `insert` (the request's KV) into the cache."""
        self._note()
        if insert:
            self.tree.insert(insert)
        self.active_tokens -= tokens
        # the inserted chain may duplicate what another request inserted meanwhile; never exceed the pool
        if self.used_tokens > self.capacity_tokens:
            self.evicted_tokens += self.tree.evict(self.used_tokens - self.capacity_tokens)
        self._note()
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            tokens, ev = self._waiters[0]
            if tokens > self.capacity_tokens - self.active_tokens - self.tree.locked_tokens:
                return  # head of line waits for running requests to finish
            self._note()
            if tokens > self.free_tokens:
                self.evicted_tokens += self.tree.evict(tokens - self.free_tokens)
            self.active_tokens += tokens
            self._waiters.popleft()
            self._note()
            ev.succeed()

    def _note(self) -> None:
        now = self.env.now
        dt = now - self._last_t
        if dt > 0:
            self._area_used += dt * self.used_tokens
            self._area_active += dt * self.active_tokens
            self._last_t = now
        self.peak_used = max(self.peak_used, self.used_tokens)
        self.peak_active = max(self.peak_active, self.active_tokens)

    def stats(self, end_s: float) -> dict[str, float]:
        self._note()
        span = max(end_s, 1e-12)
        tail = max(0.0, end_s - self._last_t)
        return {
            "capacity_tokens": self.capacity_tokens,
            "peak_used_tokens": self.peak_used,
            "mean_used_tokens": (self._area_used + tail * self.used_tokens) / span,
            "peak_active_tokens": self.peak_active,
            "mean_active_tokens": (self._area_active + tail * self.active_tokens) / span,
            "peak_used_frac": self.peak_used / self.capacity_tokens if self.capacity_tokens else 0.0,
            "evicted_tokens": self.evicted_tokens,
            "cached_tokens_end": self.tree.total_tokens,
        }
