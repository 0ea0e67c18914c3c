"""`ppd replay`: command line of experiments/replay.py."""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import shlex
import sys

import httpx

from experiments import stack as S
from experiments import workloads as W
from experiments.sweep import POLICIES
from experiments.sweep_cli import add_target_args, str_list
from ppd.tokenizer import ChatTokenizer

SCENARIOS = ("chat", "rag", "hol", "sharegpt")
DEFAULT_HOL_DOC_TOKENS = 100_000


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "replay",
        help="replay multi-turn chat / RAG / head-of-line / ShareGPT workloads per policy, with SLO goodput",
        description=__doc__,
    )
    add_target_args(p)
    p.add_argument(
        "--workload",
        type=str_list,
        default=("chat",),
        help="scenarios, comma-separated: chat (synthetic multi-turn), rag, hol (head-of-line), sharegpt (--trace)",
    )
    p.add_argument("--trace", help="ShareGPT-style JSON/JSONL file (for --workload sharegpt)")
    p.add_argument("--conversations", type=int, default=16, help="conversations (chat, hol, sharegpt)")
    p.add_argument("--rag-requests", type=int, default=24)
    p.add_argument("--rag-documents", type=int, default=6)
    p.add_argument("--mean-turns", type=float, default=4.0)
    p.add_argument("--think-mean-s", type=float, default=3.0, help="mean think time between turns (emulated s)")
    p.add_argument("--max-output-tokens", type=int, default=256, help="cap on a chat answer's length")
    p.add_argument(
        "--hol-doc-tokens",
        type=int,
        help=f"head-of-line document size (default {DEFAULT_HOL_DOC_TOKENS}, clamped to the model's context length)",
    )
    p.add_argument("--request-rate", type=float, default=2.0, help="requests per second (emulated)")
    p.add_argument("--slo-ttft-ms", type=float, default=500.0)
    p.add_argument("--slo-tpot-ms", type=float, default=50.0)
    p.add_argument("--policies", type=str_list, default=POLICIES)
    p.add_argument("--name", default="replay", help="file name stem of the outputs")
    p.set_defaults(func=main)
    return p


def build_scenarios(args: argparse.Namespace, context_length: int | None) -> tuple[dict[str, list], list[str]]:
    tok = ChatTokenizer.load()
    words = W.WordTokens(tok)
    notes: list[str] = []
    chat_kw = {
        "mean_turns": args.mean_turns,
        "think_mean_s": args.think_mean_s,
        "max_output_tokens": args.max_output_tokens,
    }
    out: dict[str, list] = {}
    for scen in args.workload:
        if scen == "chat":
            convs = W.synthetic_chat(words, args.conversations, seed=args.seed, **chat_kw)
        elif scen == "rag":
            convs = W.rag(words, args.rag_requests, seed=args.seed, n_documents=args.rag_documents)
        elif scen == "hol":
            doc = args.hol_doc_tokens or DEFAULT_HOL_DOC_TOKENS
            if context_length is not None and doc > context_length - 1024:
                notes.append(
                    f"head-of-line document: {doc} tokens asked, {context_length - 1024} used "
                    f"(model.context_length {context_length} minus room for the answer)"
                )
                doc = context_length - 1024
            else:
                notes.append(f"head-of-line document: {doc} tokens")
            convs = W.head_of_line(words, args.conversations, doc, seed=args.seed, **chat_kw)
        elif scen == "sharegpt":
            if not args.trace:
                raise ValueError("--workload sharegpt needs --trace FILE")
            convs = W.load_sharegpt(
                args.trace,
                lambda t: len(tok.encode(t)),
                max_conversations=args.conversations,
                max_output_tokens=args.max_output_tokens,
                think_mean_s=args.think_mean_s,
                seed=args.seed,
            )
            if not convs:
                raise ValueError(f"--trace {args.trace}: no conversations with a human turn")
        else:
            raise ValueError(f"unknown workload {scen!r}; known: {', '.join(SCENARIOS)}")
        out[scen] = W.schedule(convs, args.request_rate, seed=args.seed)
    return out, notes


def main(args: argparse.Namespace) -> int:
    from experiments.replay import ReplaySettings, run_replay

    try:
        hw = S.parse_hardware(args.hardware, args.link)
        with S.open_target(args.router_url, args.config, args.set, hw, args.time_scale) as target:
            ctx_len = target.config["model"]["context_length"] if target.config else None
            scenarios, notes = build_scenarios(args, ctx_len)
            settings = ReplaySettings(
                policies=tuple(args.policies),
                request_rate=args.request_rate,
                slo_ttft_ms=args.slo_ttft_ms,
                slo_tpot_ms=args.slo_tpot_ms,
                time_scale=target.time_scale,
                seed=args.seed,
            )
            out_dir = (
                pathlib.Path(args.output_dir)
                if args.output_dir
                else pathlib.Path("results") / f"emulated-{S.hardware_label(target.config, hw)}"
                if (hw.given or target.config)
                else pathlib.Path("results") / "replay"
            )
            run_config = {
                "command": "ppd " + shlex.join(sys.argv[1:]),
                "stack_config": target.config,
                "stack_overrides": target.overrides,
                "hardware": S.hardware_label(target.config, hw),
                "notes": notes,
            }
            asyncio.run(
                run_replay(
                    target.router_url,
                    scenarios,
                    settings,
                    out_dir,
                    args.name,
                    run_config,
                    not args.no_progress,
                    flush_caches=args.flush_caches,
                )
            )
            print(f"results in {out_dir}/{args.name}.json (.md, *.png)")
    except ValueError as err:
        print(f"ppd replay: {err}", file=sys.stderr)
        return 2
    except (httpx.HTTPError, RuntimeError, OSError) as err:  # router unreachable, stack failed to start (LaunchError)
        print(f"ppd replay: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0
