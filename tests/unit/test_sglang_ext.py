"""The decode-side extension for SGLang 0.5.10.post1, checked without a GPU.

What can be checked here: the version gate; that every SGLang function the patches wrap, replace or rely on is
exactly the validated source (hash), that our replacements keep SGLang's signatures, and that every SGLang name,
scheduler attribute and request attribute the patches use exists in that source; the pure routing rules; and that
the launcher refuses loudly without sglang. The scheduler logic itself runs only on the GPU box (docs/gpu.md).

The SGLang source is looked up in $PPD_SGLANG_SRC, /tmp/sgl/x/sglang (the unpacked wheel), or an installed sglang
package (located, not imported); tests that need it are skipped without it.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import pickle
import subprocess
import sys
from types import SimpleNamespace

import pytest

from ppd.sglang.ext import rules
from ppd.sglang.ext.targets import TARGETS, arg_names, function_node, module_file, verify_targets
from ppd.sglang.ext.version import SUPPORTED_SGLANG_VERSION, SGLangVersionError, check_sglang_version
from ppd.sglang.protocol import LOCAL_APPEND_HOST

EXT_DIR = pathlib.Path(__file__).resolve().parents[2] / "ppd" / "sglang" / "ext"
PATCH_MODULES = ("queueing.py", "batching.py", "admission.py", "reporting.py", "server_args_patch.py", "install.py")


def _sglang_root() -> pathlib.Path | None:
    for cand in (os.environ.get("PPD_SGLANG_SRC"), "/tmp/sgl/x/sglang"):
        if cand and (pathlib.Path(cand) / "srt" / "managers" / "scheduler.py").is_file():
            return pathlib.Path(cand)
    spec = importlib.util.find_spec("sglang")
    if spec is not None and spec.origin:
        root = pathlib.Path(spec.origin).parent
        if (root / "srt" / "managers" / "scheduler.py").is_file():
            return root
    return None


SGLANG_ROOT = _sglang_root()
needs_source = pytest.mark.skipif(SGLANG_ROOT is None, reason="SGLang 0.5.10.post1 source not found")


def _parse(name: str) -> ast.Module:
    return ast.parse((EXT_DIR / name).read_text())


# --- version gate ---------------------------------------------------------------------------------------------


def test_only_the_validated_version_passes():
    assert SUPPORTED_SGLANG_VERSION == "0.5.10.post1"
    check_sglang_version("0.5.10.post1")
    for other in ("0.5.10", "0.5.10.post2", "0.5.11", "0.4.9.post1", "unknown"):
        with pytest.raises(SGLangVersionError, match=other):
            check_sglang_version(other)
    with pytest.raises(SGLangVersionError, match="not installed"):
        check_sglang_version(None)


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="sglang is installed here")
def test_launcher_refuses_to_start_without_sglang():
    proc = subprocess.run(
        [sys.executable, "-m", "ppd.sglang.ext.launch_server", "--model-path", "x", "--disaggregation-mode", "decode"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=EXT_DIR.parents[2],
    )
    assert proc.returncode == 2
    assert "refusing to start" in proc.stderr and "0.5.10.post1" in proc.stderr


def test_scheduler_entry_point_pickles_by_reference():
    """multiprocessing "spawn" sends the scheduler's target by module + name: it must be a top-level function of a
    module the child can import without SGLang having been patched."""
    from ppd.sglang.ext import child

    restored = pickle.loads(pickle.dumps(child.run_scheduler_process))
    assert restored is child.run_scheduler_process


# --- the patched SGLang source is the validated one ------------------------------------------------------------


@needs_source
def test_every_target_is_the_validated_source():
    assert verify_targets(SGLANG_ROOT) == []
    version_file = SGLANG_ROOT / "_version.py"
    if version_file.exists():
        assert f"__version__ = version = '{SUPPORTED_SGLANG_VERSION}'" in version_file.read_text()


@needs_source
def test_a_changed_function_is_detected(tmp_path):
    """Copy one target's file, change one line inside the function, and the check names it."""
    target = next(t for t in TARGETS if t.qualname == "DecodePreallocQueue._pre_alloc")
    src = module_file(SGLANG_ROOT, target.module)
    copy = tmp_path / "sglang"
    dst = module_file(copy, target.module)
    dst.parent.mkdir(parents=True)
    text = src.read_text()
    dst.write_text(text.replace("fill_len = len(req.origin_input_ids)", "fill_len = 1 + len(req.origin_input_ids)", 1))
    problems = verify_targets(copy, (target,))
    assert len(problems) == 1 and "_pre_alloc" in problems[0]


def _our_function(module: str, name: str) -> ast.FunctionDef:
    for node in ast.walk(_parse(module)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"{name} not in {module}")


@needs_source
@pytest.mark.parametrize(
    "qualname,ours",
    [
        ("SchedulerDisaggregationDecodeMixin.get_next_disagg_decode_batch_to_run", ("batching.py", None)),
        ("SchedulerDisaggregationDecodeMixin.get_new_prebuilt_batch", ("batching.py", None)),
        ("Scheduler._add_request_to_queue", ("queueing.py", None)),
        ("Scheduler.abort_request", ("queueing.py", None)),
        ("DecodePreallocQueue._allocatable_tokens", ("admission.py", None)),
        ("DecodePreallocQueue._pre_alloc", ("admission.py", None)),
        ("SchedulerOutputProcessorMixin._get_cached_tokens_details", ("reporting.py", None)),
        ("ServerArgs._handle_pd_disaggregation", ("server_args_patch.py", None)),
    ],
)
def test_replacements_keep_sglang_signatures(qualname, ours):
    target = next(t for t in TARGETS if t.qualname == qualname)
    node, _ = function_node(SGLANG_ROOT, target)
    mine = _our_function(ours[0], target.name)  # the replacement, or the wrapper's inner function of that name
    assert arg_names(mine) == arg_names(node), f"{qualname}: {arg_names(mine)} vs SGLang {arg_names(node)}"
    assert [ast.unparse(d) for d in mine.args.defaults] == [ast.unparse(d) for d in node.args.defaults]


def test_every_wrapped_or_replaced_target_is_applied():
    install = (EXT_DIR / "install.py").read_text()
    for t in TARGETS:
        if t.kind == "relied-on":
            continue
        if t.qualname == "run_scheduler_process":
            assert "run_scheduler_process_func=run_scheduler_process" in (EXT_DIR / "launch_server.py").read_text()
            continue
        suffix = t.qualname.split(".", 1)[1]
        assert suffix in install, f"{t.qualname} is declared {t.kind} but install.py never patches it"


# --- every SGLang name the patches use exists in 0.5.10.post1 ---------------------------------------------------


def _module_defines(module: str, name: str) -> bool:
    tree = ast.parse(module_file(SGLANG_ROOT, module).read_text())
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and any(a.name == "*" for a in node.names):
            if node.module.startswith("sglang.") and _module_defines(node.module, name):
                return True
        if isinstance(node, ast.ClassDef | ast.FunctionDef) and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
        if isinstance(node, ast.ImportFrom | ast.Import) and any((a.asname or a.name) == name for a in node.names):
            return True
    return False


@needs_source
def test_sglang_imports_of_the_patches_exist():
    seen = 0
    for name in PATCH_MODULES + ("child.py", "launch_server.py"):
        for node in ast.walk(_parse(name)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sglang."):
                for alias in node.names:
                    assert _module_defines(node.module, alias.name), f"{name}: {node.module}.{alias.name} missing"
                    seen += 1
    assert seen >= 10


def _attrs_on(tree: ast.Module, var: str) -> set[str]:
    return {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == var
    }


def _sglang_attrs(files: list[str], var: str) -> set[str]:
    """Attributes SGLang itself reads/writes on `var` (e.g. self, req) in these files, plus methods it defines."""
    out: set[str] = set()
    for f in files:
        tree = ast.parse((SGLANG_ROOT / f).read_text())
        out |= _attrs_on(tree, var)
        out |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    return out


SCHEDULER_FILES = [
    "srt/managers/scheduler.py",
    "srt/disaggregation/decode.py",
    "srt/managers/scheduler_output_processor_mixin.py",
]
OURS = {"ppd_local_queue", "ppd_route", "ppd_decode_cached_tokens"}


@needs_source
def test_scheduler_attributes_used_by_the_patches_exist():
    known = _sglang_attrs(SCHEDULER_FILES, "self")
    for name in ("batching.py", "queueing.py", "admission.py"):
        used = _attrs_on(_parse(name), "self") - OURS
        assert used, name
        assert used <= known, f"{name}: unknown scheduler attributes {sorted(used - known)}"


@needs_source
def test_request_and_tree_attributes_used_by_the_patches_exist():
    req_known = _sglang_attrs(["srt/managers/schedule_batch.py", "srt/disaggregation/decode.py"], "self") | (
        _sglang_attrs(["srt/managers/scheduler.py", "srt/disaggregation/decode.py"], "req")
    )
    tree_known = _sglang_attrs(["srt/mem_cache/radix_cache.py", "srt/mem_cache/base_prefix_cache.py"], "self")
    for name in ("batching.py", "queueing.py", "admission.py", "reporting.py"):
        tree = _parse(name)
        used_req = _attrs_on(tree, "req") - OURS
        assert used_req <= req_known, f"{name}: unknown request attributes {sorted(used_req - req_known)}"
        used_tree = _attrs_on(tree, "tree_cache")
        assert used_tree <= tree_known, f"{name}: unknown tree-cache attributes {sorted(used_tree - tree_known)}"


@needs_source
def test_decode_mode_forces_the_chunk_cache_where_we_say():
    """The premise of patch (a): this exact statement sits in the function we wrap."""
    target = next(t for t in TARGETS if t.qualname == "ServerArgs._handle_pd_disaggregation")
    _, src = function_node(SGLANG_ROOT, target)
    assert 'if self.disaggregation_mode == "decode":\n        self.disable_radix_cache = True' in src


@needs_source
def test_fake_bootstrap_host_is_sglangs():
    text = (SGLANG_ROOT / "srt" / "disaggregation" / "utils.py").read_text()
    assert f'FAKE_BOOTSTRAP_HOST = "{rules.FAKE_BOOTSTRAP_HOST}"' in text


# --- pure rules -----------------------------------------------------------------------------------------------


def test_local_appends_join_the_local_queue_on_a_decode_server_only():
    assert rules.queue_for(True, False, LOCAL_APPEND_HOST) == "local"
    assert rules.queue_for(True, False, "10.0.0.1") == "transfer"
    assert rules.queue_for(True, False, None) == "transfer"
    assert rules.queue_for(True, True, LOCAL_APPEND_HOST) == "unchanged"  # retracted: SGLang's resume path
    assert rules.queue_for(False, False, LOCAL_APPEND_HOST) == "unchanged"  # prefill / normal server
    assert rules.route_of(LOCAL_APPEND_HOST) == "decode" and rules.route_of("10.0.0.1") == "prefill"


def test_fake_transfer_kv_gets_its_own_namespace():
    assert rules.kv_namespace(rules.FAKE_BOOTSTRAP_HOST, None) == rules.FAKE_KV_NAMESPACE
    assert rules.kv_namespace("10.0.0.1", None) is None
    assert rules.kv_namespace(LOCAL_APPEND_HOST, "salt") == "salt"


def test_abort_matches_rid_prefixes_like_sglang():
    q = [SimpleNamespace(rid=r) for r in ("a-1", "a-2", "b-1")]
    kept, aborted = rules.split_aborted(q, "a-", abort_all=False)
    assert [r.rid for r in kept] == ["b-1"] and [r.rid for r in aborted] == ["a-1", "a-2"]
    kept, aborted = rules.split_aborted(q, None, abort_all=True)
    assert kept == [] and len(aborted) == 3
    kept, aborted = rules.split_aborted(q, None, abort_all=False)
    assert len(kept) == 3 and aborted == []


def test_unsupported_server_flags_are_named():
    ok = SimpleNamespace(dp_size=1, pp_size=1, page_size=1, speculative_algorithm=None)
    assert rules.unsupported_flags(ok) == []
    bad = SimpleNamespace(dp_size=2, pp_size=1, page_size=64, speculative_algorithm="EAGLE", enable_hisparse=True)
    text = rules.describe(rules.unsupported_flags(bad))
    for word in ("dp_size=2", "EAGLE", "page_size=64", "HiSparse"):
        assert word in text
