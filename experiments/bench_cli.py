"""`ppd bench`: split vs colocated on the same GPUs — the light/heavy prefill x decode matrix and a multi-turn cell at
several request rates, for colocated servers, SGLang-style PD (always P-route) and PD with `auto` (experiments/bench.py).

    ppd bench                         # everything: 5 cells x rates 1,2,4 x 3 systems, time_scale 2 (~15 min, 2 cores)
    ppd bench --config configs/local.yaml --mode colocated,disaggregated --policies prefill,auto \\
        --cells light-light,light-heavy,heavy-light,heavy-heavy,multiturn --rates 1,2,4 --duration-s 30 --time-scale 2

Starts each mode's stack itself (disaggregated: --config; colocated: --colocated-config, the same number of GPUs as
normal servers), stops it after. Writes <output-dir>/<name>.json (every request), .md (tables + the command), .png.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import pathlib
import shlex
import sys

from experiments import bench as B
from experiments import stack as S
from experiments.sweep_cli import str_list
from launch.supervisor import LaunchError
from ppd.config import REPO_ROOT, ConfigError, load_config
from ppd.tokenizer import ChatTokenizer

DEFAULT_OUTPUT = REPO_ROOT / "results" / "bench"


def float_list(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return vals


def add_parser(subparsers) -> argparse.ArgumentParser:
    d = B.BenchSettings()
    p = subparsers.add_parser(
        "bench",
        help="split vs colocated on the same GPUs: light/heavy prefill x decode cells + multi-turn, per request rate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="configs/local.yaml", help="the disaggregated stack (default %(default)s)")
    p.add_argument(
        "--colocated-config",
        default="configs/local-colocated.yaml",
        help="the colocated stack: normal servers on the same number of GPUs (default %(default)s)",
    )
    p.add_argument("--mode", type=str_list, default=d.modes, help="colocated,disaggregated (default both)")
    p.add_argument(
        "--policies", type=str_list, default=d.policies, help="disaggregated policies (default prefill,auto)"
    )
    p.add_argument("--cells", type=str_list, default=d.cells, help=f"default {','.join(B.CELL_NAMES)}")
    p.add_argument("--rates", type=float_list, default=d.rates, help="Poisson request rates, req/s (default 1,2,4)")
    p.add_argument(
        "--duration-s", type=float, default=d.duration_s, help="seconds of arrivals per run (default %(default)s)"
    )
    p.add_argument(
        "--time-scale",
        type=float,
        help=f"emulator.time_scale for both stacks (default {d.time_scale:g}); results are wall / time_scale",
    )
    p.add_argument("--light-prompt-tokens", type=int, default=d.light_prompt_tokens)
    p.add_argument("--heavy-prompt-tokens", type=int, default=d.heavy_prompt_tokens)
    p.add_argument("--light-output-tokens", type=int, default=d.light_output_tokens)
    p.add_argument("--heavy-output-tokens", type=int, default=d.heavy_output_tokens)
    p.add_argument("--multiturn-think-s", type=float, default=d.multiturn_think_s, help="mean think time (s)")
    p.add_argument("--slo-ttft-ms", type=float, default=d.slo_ttft_ms)
    p.add_argument("--slo-tpot-ms", type=float, default=d.slo_tpot_ms)
    p.add_argument("--gpu", help="emulated GPU of every server in both stacks (ppd.specs.GPUS; default the configs')")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for both stacks")
    p.add_argument(
        "--simulate",
        action="store_true",
        help="run the same matrix on `ppd simulate` (the configs' hardware, same traces and metrics; no processes)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--output-dir", default=str(DEFAULT_OUTPUT))
    p.add_argument("--name", help="file name stem of the outputs (default bench, or bench-simulated)")
    p.add_argument("--quiet", action="store_true", help="no per-run lines")
    p.add_argument(
        "--report-only", action="store_true", help="rebuild <name>.md and .png from <output-dir>/<name>.json"
    )
    p.set_defaults(func=main)
    return p


def gpu_overrides(cfg_path: str, gpu: str | None, sets: list[str]) -> list[str]:
    if not gpu:
        return []
    cfg = load_config(cfg_path, sets)
    return [
        f"{role}.{i}.gpu={gpu}" for role in ("prefill", "decode", "colocated") for i in range(len(getattr(cfg, role)))
    ]


def settings_from(args: argparse.Namespace, time_scale: float) -> B.BenchSettings:
    s = B.BenchSettings(
        modes=tuple(args.mode),
        policies=tuple(args.policies),
        cells=tuple(args.cells),
        rates=tuple(args.rates),
        duration_s=args.duration_s,
        light_prompt_tokens=args.light_prompt_tokens,
        heavy_prompt_tokens=args.heavy_prompt_tokens,
        light_output_tokens=args.light_output_tokens,
        heavy_output_tokens=args.heavy_output_tokens,
        multiturn_think_s=args.multiturn_think_s,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        time_scale=time_scale,
        seed=args.seed,
    )
    for c in s.cells:
        s.cell(c)  # unknown names fail here
    B.systems_for(s.modes, s.policies)
    if s.duration_s <= 0 or s.time_scale <= 0:
        raise ValueError("--duration-s and --time-scale must be > 0")
    if min(s.light_prompt_tokens, s.heavy_prompt_tokens, s.light_output_tokens, s.heavy_output_tokens) < 1:
        raise ValueError("token counts must be >= 1")
    return s


def report_only(out_dir: pathlib.Path, name: str) -> int:
    from experiments.bench_report import bench_markdown, bench_plot

    path = out_dir / f"{name}.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        print(f"ppd bench: {path}: {err}", file=sys.stderr)
        return 2
    (out_dir / f"{name}.md").write_text(bench_markdown(doc, name))
    if doc.get("runs"):
        bench_plot(doc, out_dir / f"{name}.png")
    print(f"wrote {out_dir / name}.md (.png)")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.report_only:
        return report_only(
            pathlib.Path(args.output_dir), args.name or ("bench-simulated" if args.simulate else "bench")
        )
    echo = (lambda _m: None) if args.quiet else (lambda m: print(m, flush=True))
    command = "ppd " + shlex.join(sys.argv[1:] if sys.argv[1:2] == ["bench"] else ["bench", *sys.argv[1:]])
    configs = {"disaggregated": args.config, "colocated": args.colocated_config}
    try:
        base = load_config(args.config, list(args.set))
        time_scale = args.time_scale or B.BenchSettings().time_scale
        if base.backend != "emulated":  # real GPUs run in real time
            if args.time_scale not in (None, 1.0):
                raise ValueError("--time-scale applies to emulated stacks only")
            time_scale = 1.0
        settings = settings_from(args, time_scale)
        configs = {m: configs[m] for m in settings.modes}
        cfgs = {
            m: load_config(p, list(args.set) + gpu_overrides(p, args.gpu, list(args.set))) for m, p in configs.items()
        }
        gpus = {m: len(c.servers) for m, c in cfgs.items()}
        if len(set(gpus.values())) > 1:
            echo(f"warning: the stacks do not have the same number of GPUs: {gpus}")
        texts = B.ChatTexts(ChatTokenizer.load(base.model.tokenizer))
    except (ValueError, ConfigError) as err:
        print(f"ppd bench: {err}", file=sys.stderr)
        return 2
    doc = B.BenchDoc(settings, command, configs, backend="simulated" if args.simulate else "emulated")
    name = args.name or ("bench-simulated" if args.simulate else "bench")
    any_cfg = next(iter(cfgs.values()))
    kinds = sorted({s.gpu for c in cfgs.values() for s in c.servers})
    how = "simulated" if args.simulate else ("emulated" if base.backend == "emulated" else "real")
    doc.stacks["hardware"] = f"{max(gpus.values())} x {how} {'/'.join(kinds)}, {any_cfg.model.spec}"
    out_dir = pathlib.Path(args.output_dir)

    def save() -> None:
        B.write_outputs(doc, out_dir, name)

    systems = B.systems_for(settings.modes, settings.policies)
    if args.simulate:
        B.run_simulated(doc, cfgs, echo, save)
        doc.end_time = datetime.datetime.now().isoformat(timespec="seconds")
        print(f"wrote {', '.join(str(p) for p in B.write_outputs(doc, out_dir, name))}")
        return 0
    try:
        for mode, cfg_path in configs.items():
            sets = list(args.set) + gpu_overrides(cfg_path, args.gpu, list(args.set))
            with S.open_target(None, cfg_path, sets, time_scale=time_scale, echo=echo) as target:
                doc.stacks[mode] = {
                    "config": cfg_path,
                    "overrides": target.overrides,
                    "log_dir": target.log_dir,
                    "servers": gpus[mode],
                }
                here = [s for s in systems if s.mode == mode]
                cfg = load_config(cfg_path, target.overrides)
                asyncio.run(B.run_stack(doc, target.router_url, here, texts, echo, save, cfg))
    except (ValueError, LaunchError, RuntimeError) as err:
        print(f"ppd bench: {err}", file=sys.stderr)
        doc.end_time = datetime.datetime.now().isoformat(timespec="seconds")
        save()
        return 2
    doc.end_time = datetime.datetime.now().isoformat(timespec="seconds")
    paths = B.write_outputs(doc, out_dir, name)
    errors = sum(r["errors"] for r in doc.runs)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    if errors:
        print(f"ppd bench: {errors} requests failed (see the JSON's requests)", file=sys.stderr)
        return 1
    return 0
