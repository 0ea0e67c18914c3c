"""The SGLang 0.5.10.post1 functions the extension wraps, replaces or relies on, each pinned by a hash of its source.

A version string can lie (a local build, a patched wheel); a hash of each function's source cannot. The launcher
refuses to start if any function below differs from the one the patches were written against, and the unit tests
check the same hashes against the unpacked wheel when it is at hand. The hash covers the function's text from its
first decorator to its last line, dedented, as read with `ast` (so it does not depend on the Python version).

`python -m ppd.sglang.ext.targets SGLANG_PACKAGE_DIR` prints every target's hash (to refresh this table after
validating a new SGLang version, together with SUPPORTED_SGLANG_VERSION).
"""

from __future__ import annotations

import ast
import hashlib
import pathlib
import sys
import textwrap
from dataclasses import dataclass
from typing import Literal

Kind = Literal["wrapped", "replaced", "relied-on"]


@dataclass(frozen=True)
class Target:
    module: str  # dotted module path, e.g. "sglang.srt.disaggregation.decode"
    qualname: str  # "Class.method" or "function"
    kind: Kind
    sha256: str  # first 16 hex digits of the source's sha256 in sglang 0.5.10.post1
    why: str

    @property
    def name(self) -> str:
        return self.qualname.rsplit(".", 1)[-1]


_DECODE = "sglang.srt.disaggregation.decode"
_SCHED = "sglang.srt.managers.scheduler"

TARGETS: tuple[Target, ...] = (
    Target(
        "sglang.srt.server_args",
        "ServerArgs._handle_pd_disaggregation",
        "wrapped",
        "59db5411dc4d130e",
        "(a) forces disable_radix_cache=True in decode mode; we restore the user's value",
    ),
    Target(
        _SCHED,
        "Scheduler._add_request_to_queue",
        "wrapped",
        "074bbbf0d0d25fad",
        "(b) decode mode sends every request to the prealloc queue; local appends go to our queue instead",
    ),
    Target(
        _SCHED,
        "Scheduler.abort_request",
        "wrapped",
        "9a5dbb4c5499c252",
        "(b) an abort must also find requests still in our local-append queue",
    ),
    Target(
        _DECODE,
        "SchedulerDisaggregationDecodeMixin.get_next_disagg_decode_batch_to_run",
        "replaced",
        "bdec5090aa18544e",
        "(b) runs extend batches for local appends (as get_next_batch_to_run does) besides prebuilt + decode",
    ),
    Target(
        _DECODE,
        "SchedulerDisaggregationDecodeMixin.get_new_prebuilt_batch",
        "replaced",
        "9db9ece03e01cd32",
        "(a) with a radix cache a transferred request must not match the tree and must insert committed KV only",
    ),
    Target(
        _DECODE,
        "DecodePreallocQueue._allocatable_tokens",
        "wrapped",
        "446fe1fd24c6fce4",
        "(c) admission counted free slots only; finished turns kept in the tree are evictable, so count them",
    ),
    Target(
        _DECODE,
        "DecodePreallocQueue._pre_alloc",
        "wrapped",
        "5eb3617e8722ab80",
        "(c) allocates straight from the allocator; evict from the tree first",
    ),
    Target(
        "sglang.srt.managers.scheduler_output_processor_mixin",
        "SchedulerOutputProcessorMixin._get_cached_tokens_details",
        "wrapped",
        "7bb4048e217b621c",
        "(d) adds the route and the decode server's cached prompt tokens to meta_info.cached_tokens_details",
    ),
    Target(
        _SCHED,
        "run_scheduler_process",
        "wrapped",
        "6cf25ede9fac0250",
        "the scheduler subprocess (spawned) applies the scheduler patches before it builds the Scheduler",
    ),
    Target(
        "sglang.srt.entrypoints.http_server",
        "launch_server",
        "relied-on",
        "3b3c003786f26244",
        "takes run_scheduler_process_func: how our child entry point reaches the spawned scheduler",
    ),
    Target(
        _SCHED,
        "Scheduler.get_next_batch_to_run",
        "relied-on",
        "c328a78e4ba96a74",
        "its head (stash the chunked request, merge the last extend batch) is copied into our decode batch selection",
    ),
    Target(
        _SCHED,
        "Scheduler._get_new_batch_prefill_raw",
        "relied-on",
        "9a17819daea5d47a",
        "builds the local extend batch from self.waiting_queue / self.chunked_req (we swap our queue in)",
    ),
    Target(
        _DECODE,
        "SchedulerDisaggregationDecodeMixin.event_loop_normal_disagg_decode",
        "relied-on",
        "20d4336860dacc5a",
        "calls get_next_disagg_decode_batch_to_run once per iteration and sets last_batch to what ran",
    ),
    Target(
        _DECODE,
        "SchedulerDisaggregationDecodeMixin.event_loop_overlap_disagg_decode",
        "relied-on",
        "d7b0a50d589352b7",
        "same, with results processed one iteration late (as the normal overlap loop)",
    ),
    Target(
        "sglang.srt.disaggregation.decode_schedule_batch_mixin",
        "ScheduleBatchDisaggregationDecodeMixin.prepare_for_prebuilt",
        "relied-on",
        "18ac3284815dc851",
        "reads fill_ids / prefix_indices / extend_input_len that our get_new_prebuilt_batch sets",
    ),
    Target(
        "sglang.srt.disaggregation.decode_schedule_batch_mixin",
        "ScheduleBatchDisaggregationDecodeMixin.process_prebuilt",
        "relied-on",
        "552642b98f8c75b8",
        "calls tree_cache.cache_unfinished_req(req): with a radix cache this inserts req.fill_ids",
    ),
    Target(
        "sglang.srt.mem_cache.radix_cache",
        "RadixCache.cache_unfinished_req",
        "relied-on",
        "d909d1f483623d2c",
        "inserts fill_ids with req_to_token's indices, frees duplicates from cache_protected_len, moves the lock",
    ),
    Target(
        "sglang.srt.mem_cache.radix_cache",
        "RadixCache.cache_finished_req",
        "relied-on",
        "b3167f84a8ea0892",
        "inserts prompt + output up to kv_committed_len: how a finished turn stays reusable on the decode GPU",
    ),
    Target(
        "sglang.srt.managers.schedule_batch",
        "Req.init_next_round_input",
        "relied-on",
        "a410f1249b7c2382",
        "fill_ids = prompt + output; with tree_cache=None no match and no change of prefix_indices",
    ),
)


def module_file(sglang_root: pathlib.Path, module: str) -> pathlib.Path:
    """`sglang.srt.x.y` -> <sglang_root>/srt/x/y.py, or .../y/__init__.py for a package (sglang_root is the
    `sglang` package directory)."""
    parts = module.split(".")
    if parts[0] != "sglang":
        raise ValueError(f"not an sglang module: {module}")
    path = sglang_root.joinpath(*parts[1:])
    package = path / "__init__.py"
    return package if package.is_file() else path.with_suffix(".py")


def _find(tree: ast.Module, qualname: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    body: list[ast.stmt] = tree.body
    node: ast.AST | None = None
    for part in qualname.split("."):
        node = next(
            (
                n
                for n in body
                if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and n.name == part
            ),
            None,
        )
        if node is None:
            return None
        body = getattr(node, "body", [])
    return node if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) else None


def function_node(sglang_root: pathlib.Path, target: Target) -> tuple[ast.FunctionDef | ast.AsyncFunctionDef, str]:
    """The target's AST node and its dedented source text; raises LookupError if the function is gone."""
    path = module_file(sglang_root, target.module)
    if not path.is_file():
        raise LookupError(f"{target.module}: no file {path}")
    text = path.read_text(encoding="utf-8")
    node = _find(ast.parse(text), target.qualname)
    if node is None:
        raise LookupError(f"{target.module}.{target.qualname}: not found in {path}")
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    lines = text.splitlines()[first - 1 : node.end_lineno]
    return node, textwrap.dedent("\n".join(lines))


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]


def arg_names(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = node.args
    return [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]


def verify_targets(sglang_root: pathlib.Path, targets: tuple[Target, ...] = TARGETS) -> list[str]:
    """One line per target that is missing or whose source differs; empty when all match."""
    problems = []
    for t in targets:
        try:
            _, src = function_node(sglang_root, t)
        except LookupError as err:
            problems.append(str(err))
            continue
        found = source_hash(src)
        if found != t.sha256:
            problems.append(f"{t.module}.{t.qualname}: source hash {found} != validated {t.sha256} ({t.kind})")
    return problems


def main(argv: list[str]) -> int:
    root = pathlib.Path(argv[0]) if argv else None
    if root is None or not root.is_dir():
        print("usage: python -m ppd.sglang.ext.targets SGLANG_PACKAGE_DIR", file=sys.stderr)
        return 2
    for t in TARGETS:
        _, src = function_node(root, t)
        print(f"{source_hash(src)}  {t.kind:9s}  {t.module}.{t.qualname}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
