"""Patch (b), second half, and the radix-cache fix of the prebuilt path; scheduler process, decode mode.

SGLang 0.5.10.post1's decode server never runs an extend batch: `get_next_disagg_decode_batch_to_run`
(disaggregation/decode.py) only turns transferred requests into a "prebuilt" batch (no forward) merged into the
running decode batch. A local append needs what a normal server does in `Scheduler.get_next_batch_to_run`
(managers/scheduler.py): merge the extend batch that just ran into the running batch, then build the next one with
`get_new_batch_prefill` (PrefillAdder: radix `match_prefix`, page-budget checks, chunked prefill, optional mixing
with the running batch). We do exactly that, with our local queue swapped in for `waiting_queue` (which on a decode
server holds transferred requests), then fall back to SGLang's prebuilt + decode steps. Prefill first, as SGLang's
normal scheduler does: while a local append prefills (chunk by chunk), the running decodes wait.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.managers.schedule_batch import ScheduleBatch
from sglang.srt.observability.req_time_stats import set_schedule_time_batch, set_time_batch

from ppd.sglang.ext.queueing import LOCAL_QUEUE, local_queue, reset_tree_state


def merge_last_extend_batch(self: Any) -> None:
    """The head of Scheduler.get_next_batch_to_run: stash the request being chunked (its KV so far goes into the
    tree, locked), and merge the extend batch that ran last (minus that request and finished ones) into the running
    batch. Runs once per scheduler iteration, so each extend batch is merged exactly once."""
    chunked_req_to_exclude = set()
    if self.chunked_req is not None:
        chunked_req_to_exclude.add(self.chunked_req)
        self.stash_chunked_request(self.chunked_req)

    last = self.last_batch
    if last is None or not last.forward_mode.is_extend():
        return
    if last.chunked_req is not None:
        chunked_req_to_exclude.add(last.chunked_req)
    last_bs = last.batch_size()
    last.filter_batch(chunked_req_to_exclude=list(chunked_req_to_exclude))
    if last.batch_size() < last_bs:
        self.running_batch.batch_is_full = False
    if not last.is_empty():
        if self.running_batch.is_empty():
            self.running_batch = last
        else:
            self.running_batch.merge_batch(last)


def local_prefill_batch(self: Any) -> ScheduleBatch | None:
    """An extend batch for the local-append queue (and the request being chunked), built by SGLang's own
    `get_new_batch_prefill` over that queue; None when there is nothing to prefill or no room."""
    if not local_queue(self) and self.chunked_req is None:
        return None
    if self.running_batch.is_empty():
        self.running_batch.batch_is_full = False  # nothing runs: a stale "full" flag must not block admission
    transferred = self.waiting_queue
    self.waiting_queue = local_queue(self)
    try:
        return self.get_new_batch_prefill()
    finally:
        setattr(self, LOCAL_QUEUE, self.waiting_queue)  # what PrefillAdder did not take
        self.waiting_queue = transferred


def get_next_disagg_decode_batch_to_run(self: Any) -> ScheduleBatch | None:
    """Replaces SchedulerDisaggregationDecodeMixin.get_next_disagg_decode_batch_to_run (disaggregation/decode.py).

    SGLang's version: merge the new prebuilt batch into the running batch, then decode. Ours: first merge the
    local extend batch that ran last (as get_next_batch_to_run does), then SGLang's prebuilt merge (without its
    `assert self.chunked_req is None`: a local append may be mid-chunk, outside the running batch), then an extend
    batch for local appends if there is one, else the decode step exactly as SGLang does it."""
    merge_last_extend_batch(self)

    new_prebuilt_batch = self.get_new_prebuilt_batch()
    if new_prebuilt_batch:
        self.process_batch_result_prebuilt(new_prebuilt_batch)
        new_prebuilt_batch.filter_batch()
        if not new_prebuilt_batch.is_empty():
            if self.running_batch.is_empty():
                self.running_batch = new_prebuilt_batch
                if self.enable_hisparse:
                    self.running_batch.hisparse_coordinator = self.hisparse_coordinator
            else:
                self.running_batch.merge_batch(new_prebuilt_batch)

    ret = local_prefill_batch(self)
    if ret is None and not self.running_batch.is_empty():
        self.running_batch = self.update_running_batch(self.running_batch)
        ret = self.running_batch if not self.running_batch.is_empty() else None

    ret = self.maybe_prepare_mlp_sync_batch(ret)
    if ret:
        set_schedule_time_batch(ret)
    return ret


def prepare_transferred(req: Any, tree_cache: Any) -> None:
    """A transferred (or resumed) request before its prebuilt batch: fill_ids without a tree match (the transfer
    wrote the whole prompt into fresh slots), cut to the KV that exists. SGLang matches the tree here, which with a
    radix cache takes an unlocked prefix and double-counts cached tokens, and hands `fill_ids` including the first
    output token (no KV yet) to `cache_unfinished_req`, which would insert a stale slot into the tree."""
    req.init_next_round_input(None)
    reset_tree_state(req, tree_cache)
    # prompt + output[:-1]: what DecodePreallocQueue._pre_alloc allocated and the transfer (or CPU reload) filled
    req.fill_ids = req.fill_ids[: req.kv_committed_len]
    req.set_extend_input_len(len(req.fill_ids))


def get_new_prebuilt_batch(self: Any) -> ScheduleBatch | None:
    """Replaces SchedulerDisaggregationDecodeMixin.get_new_prebuilt_batch (disaggregation/decode.py); identical but
    for `prepare_transferred` in place of `req.init_next_round_input(self.tree_cache)`. Then SGLang's
    `process_prebuilt` -> `cache_unfinished_req` inserts the transferred prompt into the radix tree (duplicates of
    what the tree already held are freed) and locks it for the request's lifetime, as after a normal prefill."""
    if self.grammar_manager.has_waiting_grammars():
        ready_grammar_requests = self.grammar_manager.get_ready_grammar_requests()
        for req in ready_grammar_requests:
            self._add_request_to_queue(req)

    if len(self.waiting_queue) == 0:
        return None

    curr_batch_size = self.running_batch.batch_size()
    batch_size = min(self.req_to_token_pool.size, self.max_running_requests)
    num_not_used_batch = batch_size - curr_batch_size

    can_run_list: list = []
    waiting_queue: list = []
    for i, req in enumerate(self.waiting_queue):
        if i < num_not_used_batch:
            can_run_list.append(req)
            prepare_transferred(req, self.tree_cache)
        else:
            waiting_queue.append(req)

    self.waiting_queue = waiting_queue
    if len(can_run_list) == 0:
        return None

    set_time_batch(can_run_list, "set_forward_entry_time")
    new_batch = ScheduleBatch.init_new(
        can_run_list,
        self.req_to_token_pool,
        self.token_to_kv_pool_allocator,
        self.tree_cache,
        self.model_config,
        self.enable_overlap,
        self.spec_algorithm,
    )
    new_batch.prepare_for_prebuilt()
    new_batch.process_prebuilt(self.server_args, self.future_map)
    return new_batch


for _fn in (get_next_disagg_decode_batch_to_run, get_new_prebuilt_batch):
    _fn.__ppd_patch__ = True  # type: ignore[attr-defined]
