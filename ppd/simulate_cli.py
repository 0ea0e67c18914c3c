"""`ppd simulate`: discrete-event simulation (SimPy) of a P/D cluster on the roofline, for a workload or a trace.

    ppd simulate --prefill 1 --decode 1 --workload chat --rate 2 --duration 300 --seed 0 [--policy prefill] [--json out]
    ppd simulate --colocated 2 --workload rag --rate 4
    ppd simulate --sweep-ratios --gpus 6 --workload chat --rate 40 --out-dir results/simulate/chat
    ppd simulate --recommend --gpus 6 --workload rag [--rate 20]      # best P:D (0:N = colocated), with reasoning
    ppd simulate --workload trace.jsonl --prefill 2 --decode 2        # replay a JSONL trace (ppd/simulate/trace.py)

Hardware comes from --gpu/--model/--link (defaults h200, llama-3-8b, nvlink) or from a stack config (--config
configs/local.yaml: model spec, server GPU, link, chunk size, KV pool). Output: a Markdown table on stdout; --json,
--markdown, --png write files; --out-dir writes all three plus the trace that was simulated (trace.jsonl), which
`ppd replay`-style tools can send to a real or emulated stack (same issue-time rule: ppd/simulate/trace.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from typing import Any

import yaml

from experiments.metrics import Slo
from ppd.simulate.cluster import ClusterSpec, simulate
from ppd.simulate.recommend import recommend_ratio
from ppd.simulate.report import plot_sweep, recommendation_table, sweep_table, write_json
from ppd.simulate.summary import summarize
from ppd.simulate.sweep import WARMUP_FRAC, WorkloadSource, as_source, max_rate, ratio_specs
from ppd.simulate.trace import TraceError, write_trace
from ppd.simulate.workload import with_overrides


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="simulate a prefill/decode cluster (goodput under SLO, queueing, KV, link) and recommend a P:D ratio",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("cluster (one of)")
    g.add_argument("--prefill", type=int, default=None, help="prefill servers (disaggregated)")
    g.add_argument("--decode", type=int, default=None, help="decode servers (disaggregated)")
    g.add_argument("--colocated", type=int, default=None, help="colocated servers (prefill and decode on each)")
    g.add_argument("--sweep-ratios", action="store_true", help="every split of --gpus: 0:N (colocated), 1:N-1 .. N-1:1")
    g.add_argument("--recommend", action="store_true", help="sweep and recommend the best split of --gpus")
    g.add_argument("--gpus", type=int, default=None, help="GPU budget for --sweep-ratios / --recommend")
    g.add_argument("--no-colocated", action="store_true", help="leave 0:N (colocated) out of a sweep")

    w = p.add_argument_group("workload")
    w.add_argument("--workload", default="chat", help="chat | rag | long-output | fixed | PATH.jsonl (default chat)")
    w.add_argument(
        "--workload-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset field, e.g. output.a=1000 mean_turns=2 (repeatable; see ppd/simulate/workload.py)",
    )
    w.add_argument("--rate", type=float, default=None, help="requests/s (default: the preset's, or the trace's own)")
    w.add_argument("--duration", type=float, default=None, help="seconds of conversation starts (default preset's)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="leave requests issued in the first SECONDS out of the statistics (default: a quarter of a generated "
        "workload's duration; 0 for a trace)",
    )

    h = p.add_argument_group("hardware and serving knobs")
    h.add_argument("--config", default=None, help="take model, GPU, link, chunk size, KV pool from a stack config")
    h.add_argument("--gpu", default=None, help="GPU spec (ppd.specs.GPUS; default h200)")
    h.add_argument("--model", default=None, help="model spec (ppd.specs.MODELS; default llama-3-8b)")
    h.add_argument("--link", default=None, help="KV link class (ppd.specs.LINKS; default nvlink)")
    h.add_argument("--link-gbps", type=float, default=None, help="override the link's GB/s")
    h.add_argument(
        "--link-sharing",
        choices=("per-gpu", "shared", "none"),
        default=None,
        help="KV moves queue per GPU port (default), on one cluster link, or not at all (as the emulator)",
    )
    h.add_argument("--chunk-size", type=int, default=None, help="chunked prefill size (default 8192)")
    h.add_argument("--max-running-requests", type=int, default=None, help="per server (default 256)")
    h.add_argument("--kv-capacity-tokens", type=int, default=None, help="KV pool per GPU (default from memory)")
    h.add_argument("--delta-transfer", action="store_true", help="P-route moves only what the decode server lacks")
    h.add_argument("--no-request-overhead", action="store_true", help="drop the host-side per-request overhead")
    h.add_argument(
        "--policy", default=None, help="routing policy: prefill | decode | threshold | auto (default prefill)"
    )
    h.add_argument("--policy-param", action="append", default=[], metavar="KEY=VALUE", help="policy parameter")

    s = p.add_argument_group("SLO and search")
    s.add_argument("--slo-ttft-ms", type=float, default=None, help="default: the workload preset's")
    s.add_argument("--slo-tpot-ms", type=float, default=None, help="default: the workload preset's")
    s.add_argument("--attainment", type=float, default=0.9, help="share meeting the SLO for a rate to count")
    s.add_argument("--max-rate", action="store_true", help="also search each point's highest rate under the SLO")
    s.add_argument("--drain", type=float, default=120.0, help="simulate this long past the last arrival")
    s.add_argument(
        "--search-requests",
        type=int,
        default=4000,
        help="a rate search simulates about this many requests per point (default 4000) ...",
    )
    s.add_argument(
        "--search-duration", type=float, default=60.0, help="... over at least this many seconds of arrivals (60)"
    )

    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, help="write results JSON here")
    o.add_argument("--markdown", default=None, help="write the Markdown table here")
    o.add_argument("--png", default=None, help="write a plot here (sweeps)")
    o.add_argument("--out-dir", default=None, help="write simulate.json, simulate.md, simulate.png, trace.jsonl here")
    o.add_argument("--write-trace", default=None, help="write the simulated trace (JSONL) here")
    o.add_argument("--requests-out", default=None, help="write every request's timeline (JSONL) here")
    o.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)


class UsageError(ValueError):
    pass


def _kv(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"{item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def base_spec(args: argparse.Namespace) -> ClusterSpec:
    """Hardware and knobs: defaults < --config < explicit flags."""
    fields: dict[str, Any] = {}
    if args.config:
        from ppd.config import load_config

        cfg = load_config(args.config)
        servers = cfg.decode or cfg.colocated
        fields.update(
            model=cfg.model.spec,
            gpu=servers[0].gpu,
            prefill_gpu=cfg.prefill[0].gpu if cfg.prefill else None,
            link=cfg.link.kind,
            link_gbytes_per_s=cfg.link.gbytes_per_s,
            chunk_size=cfg.emulator.chunk_size if cfg.backend == "emulated" else cfg.sglang.chunked_prefill_size,
            max_running_requests=cfg.emulator.max_running_requests,
            kv_capacity_tokens=cfg.emulator.kv_capacity_tokens,
            mem_fraction_static=cfg.emulator.mem_fraction_static,
            policy=cfg.router.policy,
            policy_params=dict(cfg.router.policy_params),
            max_inflight_per_backend=cfg.router.max_inflight_per_backend,
        )
    flags = {
        "gpu": args.gpu,
        "model": args.model,
        "link": args.link,
        "link_gbytes_per_s": args.link_gbps,
        "link_sharing": args.link_sharing,
        "chunk_size": args.chunk_size,
        "max_running_requests": args.max_running_requests,
        "kv_capacity_tokens": args.kv_capacity_tokens,
        "policy": args.policy,
    }
    fields.update({k: v for k, v in flags.items() if v is not None})
    if args.gpu is not None:
        fields["prefill_gpu"] = None
    if args.policy_param:
        fields["policy_params"] = {**fields.get("policy_params", {}), **_kv(args.policy_param)}
    if args.delta_transfer:
        fields["delta_transfer"] = True
    if args.no_request_overhead:
        fields["request_overhead"] = False
    # validate names early, with the known ones in the message
    from ppd import specs
    from ppd.policies import policy_names

    spec = ClusterSpec(**fields)
    specs.model(spec.model), specs.gpu(spec.gpu), specs.link(spec.link)
    if spec.policy not in policy_names():
        raise UsageError(f"unknown policy {spec.policy!r}; known: {', '.join(policy_names())}")
    return spec


def _source(args: argparse.Namespace) -> WorkloadSource:
    src = as_source(args.workload, args.duration, args.seed)
    if args.workload_set:
        if src.spec is None:
            raise UsageError("--workload-set applies to a preset workload, not a trace")
        src = dataclasses.replace(src, spec=with_overrides(src.spec, args.workload_set))
    return src


def _outputs(args: argparse.Namespace) -> dict[str, pathlib.Path | None]:
    out = {k: (pathlib.Path(v) if v else None) for k, v in (("json", args.json), ("markdown", args.markdown))}
    out["png"] = pathlib.Path(args.png) if args.png else None
    out["trace"] = pathlib.Path(args.write_trace) if args.write_trace else None
    if args.out_dir:
        d = pathlib.Path(args.out_dir)
        out["json"] = out["json"] or d / "simulate.json"
        out["markdown"] = out["markdown"] or d / "simulate.md"
        out["png"] = out["png"] or d / "simulate.png"
        out["trace"] = out["trace"] or d / "trace.jsonl"
    return out


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (UsageError, KeyError, ValueError, TraceError) as err:
        print(f"ppd simulate: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    t0 = time.time()
    sweep = args.sweep_ratios or args.recommend
    single = [x is not None for x in (args.prefill, args.decode, args.colocated)]
    if sweep and any(single):
        raise UsageError("--sweep-ratios / --recommend take --gpus, not --prefill/--decode/--colocated")
    if sweep and not args.gpus:
        raise UsageError("--sweep-ratios / --recommend need --gpus N")
    if not sweep and args.colocated is None and (args.prefill is None) != (args.decode is None):
        raise UsageError("give both --prefill and --decode (or --colocated K)")
    if args.rate is not None and args.rate <= 0:
        raise UsageError("--rate must be > 0")

    base = base_spec(args)
    source = _source(args)
    slo_default = source.default_slo()
    slo = Slo(args.slo_ttft_ms or slo_default.ttft_ms, args.slo_tpot_ms or slo_default.tpot_ms)
    outputs = _outputs(args)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    rate = args.rate if args.rate is not None else source.default_rate
    payload: dict[str, Any] = {
        "command": "ppd simulate " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["simulate"] else sys.argv[1:]),
        "workload": source.name,
        "workload_description": source.describe(),
        "workload_spec": dataclasses.asdict(source.spec) if source.spec else None,
        "rate": rate,
        "duration_s": source.duration_s if source.spec else None,
        "seed": args.seed,
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "attainment": args.attainment,
        "cluster": {k: v for k, v in dataclasses.asdict(base).items() if k not in ("prefill", "decode", "colocated")},
    }

    trace = source.at(rate)
    if outputs["trace"]:
        write_trace(trace, outputs["trace"])

    if args.recommend:
        rec = recommend_ratio(
            source,
            args.gpus,
            slo,
            rate=args.rate,
            cluster=base,
            include_colocated=not args.no_colocated,
            attainment=args.attainment,
            search_requests=args.search_requests,
            min_duration_s=args.search_duration,
            log=log,
        )
        rows = [c.summary for c in rec.candidates if c.summary is not None]
        markdown = recommendation_table(rec)
        payload["recommendation"] = rec.to_dict()
        payload["results"] = rows
        print(markdown)
    else:
        if sweep:
            points = ratio_specs(args.gpus, base, include_colocated=not args.no_colocated)
        elif args.colocated is not None:
            points = [dataclasses.replace(base, colocated=args.colocated, prefill=0, decode=0)]
        else:
            points = [dataclasses.replace(base, prefill=args.prefill or 1, decode=args.decode or 1, colocated=0)]
        rows, max_rates = [], {}
        if source.spec is not None:
            window = source.window(rate)
            measure = (WARMUP_FRAC * window if args.warmup is None else args.warmup, window)
        else:
            measure = (args.warmup or 0.0, None)
        for spec in points:
            result = simulate(trace, spec, args.drain)
            s = summarize(result, slo, source.name, *measure)
            s["rate"] = rate
            rows.append(s)
            log(f"{spec.ratio:>5}: goodput {s['goodput_rps']:.2f} req/s, SLO met {s['slo_attainment']:.1%}")
            if args.requests_out and len(points) == 1:
                import json

                path = pathlib.Path(args.requests_out)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(json.dumps(r.record()) + "\n" for r in result.requests))
            if args.max_rate:
                r, _, _ = max_rate(
                    source,
                    spec,
                    slo,
                    args.attainment,
                    start_rate=rate,
                    search_requests=args.search_requests,
                    min_duration_s=args.search_duration,
                )
                max_rates[spec.ratio] = r
                log(f"{spec.ratio:>5}: highest rate under SLO {r:.2f} req/s")
        markdown = sweep_table(rows, max_rates or None)
        payload["results"] = rows
        if max_rates:
            payload["max_rate_rps"] = max_rates
        print(markdown)

    payload["wall_s"] = round(time.time() - t0, 2)
    if outputs["json"]:
        write_json(outputs["json"], payload)
    if outputs["markdown"]:
        outputs["markdown"].parent.mkdir(parents=True, exist_ok=True)
        outputs["markdown"].write_text(markdown + "\n")
    if outputs["png"] and len(rows) > 1:
        title = f"{source.name} on {base.gpu} + {base.model}, SLO {slo.ttft_ms:g}/{slo.tpot_ms:g} ms"
        plot_sweep(rows, outputs["png"], title)
    for key in ("json", "markdown", "png", "trace"):
        if outputs[key] and outputs[key].exists():
            log(f"wrote {outputs[key]}")
    return 0
