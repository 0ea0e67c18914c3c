"""Patch (c), scheduler process: P-route admission on a decode server whose radix tree holds finished turns.

With the chunk cache every free KV slot is in the allocator. With the radix cache kept on, finished conversations
stay in the tree (evictable, not free): SGLang's `DecodePreallocQueue._allocatable_tokens` would see the pool as
full and stall every transfer, and `_pre_alloc` allocates straight from the allocator (it asserts success). Local
appends need nothing here: PrefillAdder already counts `evictable_size()` and `alloc_token_slots` evicts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from sglang.srt.mem_cache.common import evict_from_tree_cache


def allocatable_tokens(original: Callable[..., int]) -> Callable[..., int]:
    """Wraps DecodePreallocQueue._allocatable_tokens (disaggregation/decode.py): add the tree's evictable tokens
    (0 with the chunk cache), which `_pre_alloc` below frees on demand."""

    @functools.wraps(original)
    def _allocatable_tokens(self: Any, retractable_tokens: int | None = None, count_retracted: bool = True) -> int:
        base = original(self, retractable_tokens=retractable_tokens, count_retracted=count_retracted)
        return base + self.tree_cache.evictable_size()

    _allocatable_tokens.__ppd_patch__ = True  # type: ignore[attr-defined]
    return _allocatable_tokens


def pre_alloc(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps DecodePreallocQueue._pre_alloc (disaggregation/decode.py): evict least-recently-used finished turns
    from the tree until the request's slots are free, then allocate as SGLang does."""

    @functools.wraps(original)
    def _pre_alloc(self: Any, req: Any) -> Any:
        fill_len = len(req.origin_input_ids) + max(len(req.output_ids) - 1, 0)  # SGLang's own fill_len
        evict_from_tree_cache(self.tree_cache, fill_len)
        return original(self, req)

    _pre_alloc.__ppd_patch__ = True  # type: ignore[attr-defined]
    return _pre_alloc
