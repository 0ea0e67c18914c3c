"""Radix tree over token ids with LRU leaf eviction, bounded in tokens.

The router keeps one per decode server (which conversation prefixes that server's KV holds: L for each request);
the emulated servers use the same structure as their radix cache, so both evict alike. Like SGLang's RadixCache,
only leaves are evicted, least recently used first, and a matched path is refreshed.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field


def _common_len(edge: tuple[int, ...], ids: tuple[int, ...], pos: int) -> int:
    """How many leading tokens of `edge` equal `ids[pos:]`. Slices compare in C: a whole edge at once (the common
    case: a conversation's cached turns), else by bisection, instead of a token-by-token loop in Python (a request
    walks the index up to three times before it is sent, over its whole cached history)."""
    limit = min(len(edge), len(ids) - pos)
    if edge[:limit] == ids[pos : pos + limit]:
        return limit
    lo, hi = 0, limit  # edge[:lo] matches, edge[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if edge[lo:mid] == ids[pos + lo : pos + mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(eq=False)
class _Node:
    key: tuple[int, ...] = ()
    parent: _Node | None = None
    children: dict[int, _Node] = field(default_factory=dict)
    last_access: int = 0
    lock_ref: int = 0  # >0: in use by a running request, never evicted


class PrefixIndex:
    def __init__(self, capacity_tokens: int = 0):
        """capacity_tokens <= 0 means unbounded."""
        self.capacity_tokens = capacity_tokens
        self._root = _Node()
        self._clock = itertools.count(1)
        self.total_tokens = 0

    def __len__(self) -> int:
        return self.total_tokens

    def clear(self) -> None:
        self._root = _Node()
        self.total_tokens = 0

    def _walk(self, ids: Sequence[int], touch: bool) -> tuple[int, list[_Node]]:
        """Longest cached prefix of ids: (matched length, nodes fully or partly on the path)."""
        ids = ids if isinstance(ids, tuple) else tuple(ids)
        node, pos, path = self._root, 0, []
        now = next(self._clock) if touch else 0
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                break
            k = child.key
            n = _common_len(k, ids, pos)
            if touch:
                child.last_access = now
            path.append(child)
            pos += n
            if n < len(k):
                break
            node = child
        return pos, path

    def match(self, ids: Sequence[int], touch: bool = True) -> int:
        """Length of the longest prefix of `ids` held; refreshes its LRU position."""
        return self._walk(ids, touch)[0]

    def insert(self, ids: Sequence[int]) -> int:
        """Hold `ids` (and so every prefix of it); returns how many tokens were new. Evicts LRU leaves past capacity."""
        ids = tuple(ids)
        node, pos, now = self._root, 0, next(self._clock)
        added = 0
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                leaf = _Node(key=ids[pos:], parent=node, last_access=now)
                node.children[ids[pos]] = leaf
                added = len(ids) - pos
                break
            k = child.key
            n = _common_len(k, ids, pos)
            if n < len(k):  # split the edge at n; the unmatched tail keeps its own LRU age
                mid = _Node(key=k[:n], parent=node, last_access=now)
                node.children[k[0]] = mid
                child.key = k[n:]
                child.parent = mid
                mid.children[child.key[0]] = child
                child = mid
            child.last_access = now
            pos += n
            node = child
        self.total_tokens += added
        if self.capacity_tokens > 0 and self.total_tokens > self.capacity_tokens:
            self.evict(self.total_tokens - self.capacity_tokens)
        return added

    def evict(self, num_tokens: int) -> int:
        """Drop least recently used leaves until `num_tokens` are freed (or nothing evictable is left)."""
        leaves = [(n.last_access, id(n), n) for n in self._leaves() if n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            _, _, leaf = heapq.heappop(leaves)
            parent = leaf.parent
            if parent is None:
                continue
            del parent.children[leaf.key[0]]
            freed += len(leaf.key)
            if parent is not self._root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, (parent.last_access, id(parent), parent))
        self.total_tokens -= freed
        return freed

    def lock(self, ids: Sequence[int], delta: int = 1) -> None:
        """Pin (delta=1) or unpin (delta=-1) the path of a cached prefix while a request uses it."""
        _, path = self._walk(ids, touch=False)
        for node in path:
            node.lock_ref = max(0, node.lock_ref + delta)

    def _leaves(self) -> list[_Node]:
        out, stack = [], [self._root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self._root:
                out.append(node)
        return out
