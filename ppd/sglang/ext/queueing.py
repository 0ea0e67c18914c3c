"""Patch (b), first half, scheduler process: local appends get a queue of their own on the decode server.

A D-route request carries `bootstrap_host = LOCAL_APPEND_HOST` (ppd.sglang.protocol) and a bootstrap room, so it
passes SGLang's PD check in `handle_generate_request` unchanged. Here it is kept out of the prealloc/transfer queues
(there is no prefill server to receive KV from) and put on `scheduler.ppd_local_queue`, which batching.py prefills.
Every request also gets what the radix cache needs to release it safely, and the number of its prompt tokens the
decode server already holds (reported by reporting.py).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from sglang.srt.managers.io_struct import AbortReq
from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey

from ppd.sglang.ext.rules import kv_namespace, queue_for, route_of, split_aborted

log = logging.getLogger(__name__)

LOCAL_QUEUE = "ppd_local_queue"


def local_queue(scheduler: Any) -> list:
    """The scheduler's local-append queue (created on first use; it lives as long as the scheduler)."""
    queue = getattr(scheduler, LOCAL_QUEUE, None)
    if queue is None:
        queue = []
        setattr(scheduler, LOCAL_QUEUE, queue)
    return queue


def reset_tree_state(req: Any, tree_cache: Any) -> None:
    """No prefix matched, nothing locked: the state a radix cache's release paths (cache_finished_req with or
    without insert) accept. SGLang's Req starts with last_node=None, which only the chunk cache tolerates."""
    import torch

    req.prefix_indices = torch.empty((0,), dtype=torch.int64)
    req.last_node = getattr(tree_cache, "root_node", None)  # None: the chunk cache (--disable-radix-cache kept)
    req.cache_protected_len = 0


def cached_prompt_tokens(tree_cache: Any, req: Any) -> int:
    """How many leading prompt tokens the decode server's radix tree holds now (a read-only peek, no lock)."""
    if tree_cache.is_chunk_cache() or not req.origin_input_ids:
        return 0
    key = RadixKey(token_ids=list(req.origin_input_ids), extra_key=req.extra_key)
    return len(tree_cache.match_prefix(MatchPrefixParams(key=key)).device_indices)


def add_request_to_queue(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps Scheduler._add_request_to_queue (managers/scheduler.py). In decode mode SGLang sends every request to
    `disagg_decode_prealloc_queue`; a local append instead joins our queue, like a normal server's waiting queue."""

    @functools.wraps(original)
    def _add_request_to_queue(self: Any, req: Any, is_retracted: bool = False) -> None:
        from sglang.srt.disaggregation.utils import DisaggregationMode

        decode = self.disaggregation_mode == DisaggregationMode.DECODE
        where = queue_for(decode, is_retracted, req.bootstrap_host)
        if where == "unchanged":
            return original(self, req, is_retracted)
        req.extra_key = kv_namespace(req.bootstrap_host, req.extra_key)
        req.ppd_route = route_of(req.bootstrap_host)
        req.ppd_decode_cached_tokens = cached_prompt_tokens(self.tree_cache, req)
        reset_tree_state(req, self.tree_cache)
        if where == "transfer":
            return original(self, req, is_retracted)
        local_queue(self).append(req)
        req.time_stats.set_wait_queue_entry_time()
        return None

    _add_request_to_queue.__ppd_patch__ = True  # type: ignore[attr-defined]
    return _add_request_to_queue


def abort_local_appends(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps Scheduler.abort_request (managers/scheduler.py): requests still waiting in our local queue hold no KV;
    drop them and tell the tokenizer manager, as SGLang does for its own waiting queue. The rest is SGLang's."""

    @functools.wraps(original)
    def abort_request(self: Any, recv_req: Any) -> Any:
        kept, aborted = split_aborted(local_queue(self), recv_req.rid, recv_req.abort_all)
        if aborted:
            setattr(self, LOCAL_QUEUE, kept)
            for req in aborted:
                self.send_to_tokenizer.send_output(AbortReq(rid=req.rid), req)
                log.debug("ppd.sglang.ext: abort queued local append %s", req.rid)
        return original(self, recv_req)

    abort_request.__ppd_patch__ = True  # type: ignore[attr-defined]
    return abort_request
