"""Pure decisions of the decode-side extension (no SGLang import): which queue a request joins, what an abort
removes, which server flags the extension refuses. The patches in this package only glue these into SGLang."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, TypeVar

from ppd.sglang.protocol import LOCAL_APPEND_HOST

# sglang.srt.disaggregation.utils.FAKE_BOOTSTRAP_HOST: warm-up and /health requests on a PD server; their KV is never
# transferred (the slots hold garbage), so with a radix cache they must live in a namespace no real request matches.
FAKE_BOOTSTRAP_HOST = "2.2.2.2"
FAKE_KV_NAMESPACE = "ppd-fake-transfer"  # Req.extra_key: a separate radix namespace

Queue = Literal["local", "transfer", "unchanged"]
Route = Literal["decode", "prefill"]


def queue_for(decode_mode: bool, is_retracted: bool, bootstrap_host: str | None) -> Queue:
    """Where Scheduler._add_request_to_queue sends a request on a server running the extension.

    - "local": a D-route request (bootstrap_host == LOCAL_APPEND_HOST) on a decode server: matched against the
      radix tree and prefilled here;
    - "transfer": any other request on a decode server: SGLang's prealloc -> transfer -> prebuilt path;
    - "unchanged": not a decode server, or a retracted request (it resumes through SGLang's retracted queue, whatever
      its route: after its prefill a local append is just a running request with KV, like a transferred one).
    """
    if not decode_mode or is_retracted:
        return "unchanged"
    return "local" if bootstrap_host == LOCAL_APPEND_HOST else "transfer"


def route_of(bootstrap_host: str | None) -> Route:
    return "decode" if bootstrap_host == LOCAL_APPEND_HOST else "prefill"


def kv_namespace(bootstrap_host: str | None, extra_key: str | None) -> str | None:
    """The radix `extra_key` a request's KV is cached under: fake-transfer requests get their own namespace."""
    if bootstrap_host == FAKE_BOOTSTRAP_HOST:
        return FAKE_KV_NAMESPACE
    return extra_key


T = TypeVar("T")


def split_aborted(queue: Sequence[T], rid: str | None, abort_all: bool) -> tuple[list[T], list[T]]:
    """(kept, aborted) for Scheduler.abort_request: SGLang aborts every rid that starts with the given one."""
    kept: list[T] = []
    aborted: list[T] = []
    for req in queue:
        if abort_all or (rid is not None and getattr(req, "rid", "").startswith(rid)):
            aborted.append(req)
        else:
            kept.append(req)
    return kept, aborted


# server flags under which the extension has not been reasoned through or tried; it refuses them loudly
_UNSUPPORTED: tuple[tuple[str, Any, str], ...] = (
    ("dp_size", 1, "data parallelism (several schedulers behind one server)"),
    ("pp_size", 1, "pipeline parallelism (a different event loop)"),
    ("enable_dp_attention", False, "DP attention"),
    ("speculative_algorithm", None, "speculative decoding"),
    ("enable_hierarchical_cache", False, "the hierarchical (host) cache"),
    ("enable_hisparse", False, "HiSparse"),
    ("enable_streaming_session", False, "streaming sessions"),
    ("disaggregation_decode_enable_offload_kvcache", False, "decode KV offload"),
    ("enable_pdmux", False, "PD multiplexing"),
)


def unsupported_flags(server_args: Any) -> list[str]:
    """Human-readable reasons the extension refuses these server args (empty = fine)."""
    out = []
    for name, ok, what in _UNSUPPORTED:
        value = getattr(server_args, name, ok)
        if value != ok:
            out.append(f"{what} ({name}={value!r})")
    if getattr(server_args, "page_size", 1) not in (None, 1):
        out.append(f"page_size={server_args.page_size} (validated with page_size 1: the triton backend's default)")
    return out


def describe(items: Iterable[str]) -> str:
    return "; ".join(items)
