"""Decode-side append-prefill (the D-route) on real SGLang 0.5.10.post1, as a few explicit monkeypatches.

Started as `python -m ppd.sglang.ext.launch_server <sglang.launch_server args>` (ppd launch does this for decode
servers when `sglang.decode_local_append: true`). On a `--disaggregation-mode decode` server:

(a) server_args_patch: the radix cache stays on (SGLang forces the chunk cache), so a finished request's KV,
    prompt and generated tokens, stays in the tree for the conversation's next turn;
(b) queueing + batching: a request whose `bootstrap_host` is LOCAL_APPEND_HOST skips the prealloc/transfer queues:
    it is matched against the tree and its uncached suffix is prefilled on this GPU by an extend batch built by
    SGLang's own `get_new_batch_prefill` (PrefillAdder, chunked prefill), then merged into the running decode batch;
    transferred (P-route) requests are inserted into the tree correctly (batching.get_new_prebuilt_batch);
(c) admission: P-route admission counts the tree's evictable tokens and evicts before allocating;
(d) reporting: each response says which route it took and how many prompt tokens this server already held
    (`meta_info.cached_tokens_details`); why the P-route cannot skip that prefix in 0.5.10.post1 is in reporting.py.

Every SGLang function touched is listed, with a hash of its validated source, in targets.py; the launcher refuses to
start on any other sglang. Importing this package imports nothing from SGLang.
"""

from ppd.sglang.ext.version import SUPPORTED_SGLANG_VERSION, SGLangVersionError, check_sglang_version

__all__ = ["SUPPORTED_SGLANG_VERSION", "SGLangVersionError", "check_sglang_version"]
