"""The scheduler subprocess's entry point when the extension is on.

SGLang spawns the scheduler with multiprocessing "spawn": the child unpickles its target by module and name and
re-imports SGLang, so patches made in the launcher process are gone there. `launch_server` accepts the function to
run (`run_scheduler_process_func`); ours applies the scheduler patches, then runs SGLang's own.
"""

from __future__ import annotations

import sys
from typing import Any


def run_scheduler_process(*args: Any, **kwargs: Any) -> Any:
    """Wraps sglang.srt.managers.scheduler.run_scheduler_process: same arguments, patches applied first."""
    from sglang.srt.managers.scheduler import run_scheduler_process as sglang_run_scheduler_process

    from ppd.sglang.ext.install import apply_scheduler_patches

    apply_scheduler_patches()
    print(
        "ppd.sglang.ext: scheduler patches applied (local append, radix cache kept on decode)",
        file=sys.stderr,
        flush=True,
    )
    return sglang_run_scheduler_process(*args, **kwargs)
