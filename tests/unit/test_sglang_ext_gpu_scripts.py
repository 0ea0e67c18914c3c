"""The pure parts of the GPU measurement scripts that judge the decode-side extension (experiments/gpu_*.py): what
counts as token identity and as cache reuse, and the per-token timing arithmetic."""

from __future__ import annotations

import pathlib
import subprocess

import pytest

from experiments import gpu_common as G
from experiments import gpu_identity as ident

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_first_difference_positions():
    assert ident.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert ident.first_difference([1, 2, 3], [1, 9, 3]) == 1
    assert ident.first_difference([1, 2], [1, 2, 3]) == 2  # a shorter output differs where it stops
    assert ident.first_difference([], []) is None


def test_routes_of_each_path():
    assert [ident.route_of("single", k) for k in range(3)] == ["single"] * 3
    assert [ident.route_of("decode", k) for k in range(3)] == ["decode"] * 3
    assert [ident.route_of("prefill", k) for k in range(3)] == ["prefill"] * 3
    assert [ident.route_of("prefill-then-decode", k) for k in range(3)] == ["prefill", "decode", "decode"]


def _turn(k, route, out, prompt, cached=0, expected=None):
    return {
        "turn": k,
        "route": route,
        "prompt_tokens": prompt,
        "output_ids": out,
        "ok": True,
        "ttft_ms": 1.0,
        "cached_tokens": cached,
        "expected_cached_tokens": expected,
        "cached_tokens_details": {"ppd_decode_cached_tokens": cached} if route != "single" else {},
    }


def test_compare_flags_identity_and_cache_reuse_per_turn():
    ref = {"paths": {"single": [_turn(1, "single", [5, 6], 10), _turn(2, "single", [7, 8], 14, 11, 11)]}}
    other = {
        "paths": {
            "decode": [_turn(1, "decode", [5, 6], 10), _turn(2, "decode", [7, 8], 14, 11, 11)],
            "prefill": [_turn(1, "prefill", [5, 6], 10), _turn(2, "prefill", [7, 9], 14)],
            "prefill-then-decode": [_turn(1, "prefill", [5, 6], 10), _turn(2, "decode", [7, 8], 14, 10, 11)],
        },
        "alive_after_idle": {"http://d": True},
    }
    doc = ident.compare([ref, other], "single")
    rows = {(r["path"], r["turn"]): r for r in doc["rows"]}
    assert rows[("decode", 2)]["identical"] and rows[("decode", 2)]["cache_reuse_ok"]
    assert rows[("prefill", 2)]["identical"] is False and rows[("prefill", 2)]["first_difference"] == 1
    assert rows[("prefill-then-decode", 2)]["cache_reuse_ok"] is False  # held 10, expected 11
    assert "identical" not in rows[("single", 1)]
    assert doc["alive_after_idle"] == {"http://d": True}


def test_generation_timing():
    g = G.Generation(route="decode", prompt_len=4, output_ids=[1, 2, 3], token_times_s=[0.1, 0.2, 0.3])
    assert g.ok and g.ttft_s == 0.1
    assert g.decode_tok_per_s == pytest.approx(10.0)
    assert G.Generation(route="x", prompt_len=1).decode_tok_per_s is None


@pytest.mark.parametrize("script", sorted((ROOT / "scripts" / "gpu").glob("*.sh")))
def test_on_box_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
