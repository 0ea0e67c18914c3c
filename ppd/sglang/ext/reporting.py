"""Patch (d), scheduler process: report what the decode server already held, per request.

Every response from a decode server running the extension carries, in `meta_info.cached_tokens_details`:
`ppd_route` ("decode" for a local append, "prefill" for a transferred request) and `ppd_decode_cached_tokens` (how
many leading prompt tokens its radix tree held when the request arrived). `meta_info.cached_tokens` keeps SGLang's
meaning: the prefill server's hits on the P-route, this server's hits on the D-route.

Why the P-route still moves the whole prompt (no delta transfer) in 0.5.10.post1: the prefill side sends KV chunk by
chunk from `req.start_send_idx` = 0 (disaggregation/prefill.py `send_kv_chunk`), and Mooncake's sender maps chunk
positions onto the decode side's destination slots by position (`req.dst_kv_indices[kv_chunk.index_slice]`,
disaggregation/mooncake/conn.py); when the decode offers fewer slots than the prefill sends, it keeps the *head* of
the chunk (`prefill_kv_indices[: len(dst)]`). A decode-side patch alone can offer only whole-prompt destinations:
skipping the prefix it holds needs the prefill side to start at that offset, i.e. the offset carried from decode to
prefill in the bootstrap handshake. Upstream SGLang added that after 0.5.10.post1 (sgl-project/sglang PR #19746,
NIXL only, flag `--disaggregation-decode-enable-radix-cache`; Mooncake in later PRs #24257/#26288). Here the duplicate of the prefix that arrives is freed on
arrival (`cache_unfinished_req`), so the KV move is paid in full but the memory is not held twice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


def cached_tokens_details(original: Callable[..., dict | None]) -> Callable[..., dict | None]:
    """Wraps SchedulerOutputProcessorMixin._get_cached_tokens_details (managers/scheduler_output_processor_mixin.py),
    whose dict reaches the client as meta_info.cached_tokens_details: add our two fields."""

    @functools.wraps(original)
    def _get_cached_tokens_details(self: Any, req: Any) -> dict | None:
        details = original(self, req)
        route = getattr(req, "ppd_route", None)
        if route is None:
            return details
        out = dict(details) if details else {"device": 0, "host": 0}
        out["ppd_route"] = route
        out["ppd_decode_cached_tokens"] = getattr(req, "ppd_decode_cached_tokens", 0)
        return out

    _get_cached_tokens_details.__ppd_patch__ = True  # type: ignore[attr-defined]
    return _get_cached_tokens_details
