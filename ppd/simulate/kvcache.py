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
    """Radix tree over segment chains with LRU leaf eviction (no capacity of its own: the pool bounds it)."""

    def __init__(self) -> None:
        self._root = _Node()
        self._clock = itertools.count(1)
        self.total_tokens = 0
        self.locked_tokens = 0  # tokens of nodes with lock_ref > 0 (locking a path locks every ancestor)

    def match(self, segs: Sequence[Segment], touch: bool = False) -> tuple[int, list[_Node]]:
        """Tokens of the longest cached prefix of `segs`, and the nodes on it."""
        node, matched, path = self._root, 0, []
        now = next(self._clock) if touch else 0
        for key, _ in segs:
            child = node.children.get(key)
            if child is None:
                break
            if touch:
                child.last_access = now
            path.append(child)
            matched += child.tokens
            node = child
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
            child.last_access = now
            node = child
        self.total_tokens += added
        return added

    def lock(self, path: Sequence[_Node], delta: int) -> None:
        for node in path:
            before = node.lock_ref
            node.lock_ref = max(0, before + delta)
            if before == 0 and node.lock_ref > 0:
                self.locked_tokens += node.tokens
            elif before > 0 and node.lock_ref == 0:
                self.locked_tokens -= node.tokens

    @property
    def evictable_tokens(self) -> int:
        return self.total_tokens - self.locked_tokens

    def evict(self, num_tokens: int) -> int:
        """Drop least recently used unlocked leaves until `num_tokens` are freed (or nothing is left to drop)."""
        if num_tokens <= 0:
            return 0
        leaves = [(n.last_access, id(n), n) for n in self._leaves() if n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            _, _, leaf = heapq.heappop(leaves)
            parent = leaf.parent
            if parent is None:
                continue
            del parent.children[leaf.key]
            freed += leaf.tokens
            if parent is not self._root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, (parent.last_access, id(parent), parent))
        self.total_tokens -= freed
        return freed

    def _leaves(self) -> list[_Node]:
        out, stack = [], [self._root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self._root:
                out.append(node)
        return out


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
