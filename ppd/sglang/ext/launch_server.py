"""`python -m ppd.sglang.ext.launch_server <sglang.launch_server arguments>`: SGLang's HTTP server with our patches.

Same flags as `python -m sglang.launch_server`. Refuses to start unless the installed sglang is 0.5.10.post1 and the
patched functions are the validated source (targets.py). On a `--disaggregation-mode decode` server it keeps the
radix cache and serves local appends (the D-route); on any other server the patches change nothing.
"""

from __future__ import annotations

import os
import sys

from ppd.sglang.ext.version import SGLangVersionError


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    from ppd.sglang.ext.install import apply_main_process_patches, check_server_args, verify_sglang

    try:
        root = verify_sglang()
    except SGLangVersionError as err:
        print(f"ppd.sglang.ext: refusing to start: {err}", file=sys.stderr, flush=True)
        return 2

    apply_main_process_patches()  # before ServerArgs is built: it forces the chunk cache in __post_init__
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    server_args = prepare_server_args(args)
    if server_args.grpc_mode or server_args.encoder_only or getattr(server_args, "use_ray", False):
        print("ppd.sglang.ext: only the HTTP server is supported (no gRPC, encoder or Ray modes)", file=sys.stderr)
        return 2
    check_server_args(server_args)
    print(
        f"ppd.sglang.ext: sglang at {root}, mode={server_args.disaggregation_mode}, "
        f"radix cache {'off' if server_args.disable_radix_cache else 'on'}",
        file=sys.stderr,
        flush=True,
    )

    from sglang.srt.entrypoints.http_server import launch_server

    from ppd.sglang.ext.child import run_scheduler_process

    try:
        launch_server(server_args, run_scheduler_process_func=run_scheduler_process)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
