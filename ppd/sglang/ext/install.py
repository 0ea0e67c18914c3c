"""Applying the patches: once per process, each onto the exact SGLang attribute named in targets.py.

Two processes matter. The launcher (main) process builds ServerArgs: patch (a) goes there. The scheduler runs in a
subprocess started with multiprocessing "spawn" (SGLang sets it), which re-imports SGLang from scratch: patches
(b)-(d) are applied there by child.run_scheduler_process before the Scheduler is built.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Callable
from typing import Any

from ppd.sglang.ext.rules import describe, unsupported_flags
from ppd.sglang.ext.targets import TARGETS, Target, verify_targets
from ppd.sglang.ext.version import SGLangVersionError, check_sglang_version, installed_sglang_version

log = logging.getLogger(__name__)


def _target(module: str, qualname: str) -> Target:
    for t in TARGETS:
        if t.module == module and t.qualname == qualname:
            return t
    raise KeyError(f"{module}.{qualname} is not a declared target (ppd/sglang/ext/targets.py)")


def _patch(cls: type, module: str, qualname: str, make: Callable[[Any], Any] | None = None, new: Any = None) -> None:
    """Set `cls.<name>` to `make(original)` (wrapped) or `new` (replaced); a second call is a no-op."""
    t = _target(module, qualname)
    if (t.kind == "wrapped") != (make is not None) or (t.kind == "replaced") != (new is not None):
        raise ValueError(f"{qualname} is declared {t.kind} in targets.py")
    current = getattr(cls, t.name)
    if getattr(current, "__ppd_patch__", False):
        return
    setattr(cls, t.name, make(current) if make is not None else new)


def verify_sglang() -> pathlib.Path:
    """The installed sglang is the validated version and every target function is the validated source; returns
    the sglang package directory. Raises SGLangVersionError naming what differs."""
    check_sglang_version(installed_sglang_version())
    import sglang

    root = pathlib.Path(sglang.__file__).resolve().parent
    problems = verify_targets(root)
    if problems:
        raise SGLangVersionError(
            "sglang's source differs from the validated 0.5.10.post1 in functions the extension patches: "
            + describe(problems)
        )
    return root


def check_server_args(server_args: Any) -> None:
    problems = unsupported_flags(server_args) if server_args.disaggregation_mode == "decode" else []
    if problems:
        raise SystemExit("ppd.sglang.ext: not supported on a decode server with local appends: " + describe(problems))


def apply_main_process_patches() -> None:
    """Patch (a): must run before `prepare_server_args` builds the ServerArgs."""
    from sglang.srt.server_args import ServerArgs

    from ppd.sglang.ext.server_args_patch import keep_radix_cache_on_decode

    _patch(ServerArgs, "sglang.srt.server_args", "ServerArgs._handle_pd_disaggregation", keep_radix_cache_on_decode)


def apply_scheduler_patches() -> None:
    """Patches (b)-(d), in the scheduler subprocess."""
    from sglang.srt.disaggregation.decode import DecodePreallocQueue
    from sglang.srt.managers.scheduler import Scheduler

    from ppd.sglang.ext import admission, batching, queueing, reporting

    sched, decode = "sglang.srt.managers.scheduler", "sglang.srt.disaggregation.decode"
    mixin = "SchedulerDisaggregationDecodeMixin"
    _patch(Scheduler, sched, "Scheduler._add_request_to_queue", queueing.add_request_to_queue)
    _patch(Scheduler, sched, "Scheduler.abort_request", queueing.abort_local_appends)
    _patch(
        Scheduler,
        decode,
        f"{mixin}.get_next_disagg_decode_batch_to_run",
        new=batching.get_next_disagg_decode_batch_to_run,
    )
    _patch(Scheduler, decode, f"{mixin}.get_new_prebuilt_batch", new=batching.get_new_prebuilt_batch)
    _patch(DecodePreallocQueue, decode, "DecodePreallocQueue._allocatable_tokens", admission.allocatable_tokens)
    _patch(DecodePreallocQueue, decode, "DecodePreallocQueue._pre_alloc", admission.pre_alloc)
    _patch(
        Scheduler,
        "sglang.srt.managers.scheduler_output_processor_mixin",
        "SchedulerOutputProcessorMixin._get_cached_tokens_details",
        reporting.cached_tokens_details,
    )
    log.info("ppd.sglang.ext: scheduler patches applied (decode-side local append, radix cache kept)")
