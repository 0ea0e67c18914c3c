"""`ppd sweep`: command line of experiments/sweep.py."""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import shlex
import sys

import httpx

from experiments import stack as S
from experiments.sweep import L_FULL, L_MINIMAL, L_VALIDATE, M_FULL, M_MINIMAL, M_VALIDATE, POLICIES, SweepSettings


def int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return vals


def str_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target (exactly one)")
    g.add_argument("--router-url", help="a running AppendRouter, e.g. http://127.0.0.1:8000")
    g.add_argument("--config", help="start this stack config (embedded: configs/local.yaml) and stop it after")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (with --config)")
    p.add_argument("--hardware", help="prefill=GPU,decode=GPU (with --config: sets every server's gpu)")
    p.add_argument("--link", help="link class (nvlink, rdma-400g, rdma-100g, tcp-25g, ...; with --config: link.kind)")
    p.add_argument(
        "--time-scale",
        type=float,
        help="emulator time scale (with --config: sets emulator.time_scale; with --router-url: what the stack runs "
        "at). Reported times are wall / time_scale = emulated GPU ms",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", help="default results/emulated-<prefill>-<decode>-<link>/ (or results/sweep/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--flush-caches",
        action="store_true",
        help="empty every server's cache (POST /flush_cache) before each background level (sweep) or policy "
        "(replay), so no run inherits an earlier one's KV pool state",
    )


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sweep",
        help="m x L append-prefill sweep per policy (optionally under background decode load)",
        description=__doc__,
    )
    add_target_args(p)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--minimal", action="store_true", help=f"m in {M_MINIMAL} x L in {L_MINIMAL}")
    size.add_argument("--validate-only", action="store_true", help=f"m in {M_VALIDATE} x L in {L_VALIDATE}")
    p.add_argument("--m-values", type=int_list, help=f"append lengths (default {','.join(map(str, M_FULL))})")
    p.add_argument("--l-values", type=int_list, help=f"context lengths (default {','.join(map(str, L_FULL))})")
    p.add_argument("--policies", type=str_list, default=POLICIES, help="default prefill,decode,auto,threshold")
    p.add_argument("--repetitions", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=32, help="output tokens of the measured append (1..150)")
    p.add_argument("--background-streams", type=int_list, default=(0,), help="load levels N, e.g. 0,8,32,128")
    p.add_argument("--bg-prompt-tokens", type=int, default=2048)
    p.add_argument("--bg-output-tokens", type=int, default=1024)
    p.add_argument("--bg-before-tokens", type=int, default=32, help="background tokens in the 'before' window")
    p.add_argument(
        "--bg-direct",
        action="store_true",
        help="send the background streams straight to the router's first prefill + decode server (PD protocol) "
        "instead of through the router, so their token times show the decode GPU's interference, not the router's "
        "relay load",
    )
    p.add_argument("--bg-max-points", type=int, help="at N > 0 measure only this many grid points (even subset)")
    p.add_argument("--cost-weight", type=float, default=1.0, help="weight of the background streams' extra wait")
    p.add_argument("--warmup-policy", default="prefill", help="policy of the warm-up turn that caches the history")
    p.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos (outputs may end early)")
    p.add_argument(
        "--prompt-format",
        choices=("ids", "text"),
        default="ids",
        help="ids: /v1/completions with token-id prompts (default; keeps the router's tokenizer out of TTFT); "
        "text: the same single-token words as text",
    )
    p.add_argument("--report-only", action="store_true", help="rebuild JSON/CSV/plots/Markdown from the output dir")
    p.add_argument("--name", default="sweep", help="file name stem of the outputs")
    p.set_defaults(func=main)
    return p


def settings_from_args(args: argparse.Namespace, time_scale: float) -> SweepSettings:
    if args.validate_only:
        ms, ls = M_VALIDATE, L_VALIDATE
    elif args.minimal:
        ms, ls = M_MINIMAL, L_MINIMAL
    else:
        ms, ls = M_FULL, L_FULL
    if not 1 <= args.max_new_tokens <= 150:
        raise ValueError("--max-new-tokens must be in 1..150")
    if args.repetitions < 1:
        raise ValueError("--repetitions must be >= 1")
    return SweepSettings(
        m_values=args.m_values or ms,
        l_values=args.l_values or ls,
        policies=tuple(args.policies),
        repetitions=args.repetitions,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        background_streams=tuple(args.background_streams),
        bg_prompt_tokens=args.bg_prompt_tokens,
        bg_output_tokens=args.bg_output_tokens,
        bg_before_tokens=args.bg_before_tokens,
        bg_max_points=args.bg_max_points,
        bg_direct=args.bg_direct,
        cost_weight=args.cost_weight,
        warmup_policy=args.warmup_policy,
        time_scale=time_scale,
        ignore_eos=not args.no_ignore_eos,
        prompt_format=args.prompt_format,
    )


def default_output_dir(args: argparse.Namespace, hw: S.Hardware, cfg: dict | None) -> pathlib.Path:
    if args.output_dir:
        return pathlib.Path(args.output_dir)
    if hw.given or cfg is not None:
        return pathlib.Path("results") / f"emulated-{S.hardware_label(cfg, hw)}"
    return pathlib.Path("results") / "sweep"


def main(args: argparse.Namespace) -> int:
    from experiments.sweep import rebuild_outputs, run_sweep

    try:
        if args.report_only:
            if not args.output_dir:
                raise ValueError("--report-only needs --output-dir")
            rebuild_outputs(pathlib.Path(args.output_dir), args.name, args.cost_weight)
            print(f"rebuilt {args.output_dir}/{args.name}.json (.csv, .md, *.png)")
            return 0
        hw = S.parse_hardware(args.hardware, args.link)
        with S.open_target(args.router_url, args.config, args.set, hw, args.time_scale) as target:
            settings = settings_from_args(args, target.time_scale)
            out_dir = default_output_dir(args, hw, target.config)
            run_config = {
                "command": "ppd " + shlex.join(sys.argv[1:]),
                "stack_config": target.config,
                "stack_overrides": target.overrides,
                "stack_logs": target.log_dir,
                "hardware": S.hardware_label(target.config, hw),
            }
            asyncio.run(
                run_sweep(
                    target.router_url,
                    settings,
                    out_dir,
                    args.name,
                    run_config,
                    target.decode_urls,
                    progress=not args.no_progress,
                    flush_caches=args.flush_caches,
                )
            )
            print(f"results in {out_dir}/{args.name}.json (.csv, .md, *.png)")
    except ValueError as err:
        print(f"ppd sweep: {err}", file=sys.stderr)
        return 2
    except (httpx.HTTPError, RuntimeError, OSError) as err:  # router unreachable, stack failed to start (LaunchError)
        print(f"ppd sweep: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0
