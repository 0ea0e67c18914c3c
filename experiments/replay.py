"""`ppd replay`: multi-turn workloads replayed through the router at a request rate, per policy, with SLO goodput.

Each conversation starts at its scheduled time and sends its turns in order through /v1/chat/completions (streaming,
the full history each time, the previous answers as the router returned them, so the router finds the cached
prefix); between turns the user "thinks" for the turn's think time. All conversations run concurrently. Every policy
replays the same workload with a different nonce at the start of the system message (fresh per run), so no policy
profits from another's cached prefixes, nor from an earlier run's. Times (arrivals, think times, SLOs, results) are emulated time: wall / time_scale.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import pathlib
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tqdm import tqdm

from experiments import metrics as M
from experiments.client import flush_server_caches, make_client, model_id, probe_policies, stream_request
from experiments.report import _clean, ordered
from experiments.workloads import Conversation


@dataclass(frozen=True)
class ReplaySettings:
    policies: tuple[str, ...] = ("prefill", "decode", "auto", "threshold")
    request_rate: float = 2.0  # requests per second (emulated)
    slo_ttft_ms: float = 500.0
    slo_tpot_ms: float = 50.0
    time_scale: float = 1.0
    seed: int = 0
    temperature: float = 0.0
    ignore_eos: bool = True


@dataclass
class RequestRecord:
    conv_id: str
    kind: str
    turn: int
    arrival_s: float  # emulated seconds since the replay's start
    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    output_tokens: int
    prompt_tokens: int | None
    cached_tokens: int | None
    route: str | None
    ok: bool
    error: str | None = None


async def _conversation(
    client,
    url: str,
    model: str,
    conv: Conversation,
    policy: str,
    nonce: str,
    s: ReplaySettings,
    t0: float,
    out: list,
    bar,
) -> None:
    scale = s.time_scale
    await asyncio.sleep(max(0.0, t0 + conv.start_s * scale - time.perf_counter()))
    messages: list[dict[str, str]] = [{"role": "system", "content": f"[session {nonce}]{conv.system}"}]
    for k, turn in enumerate(conv.turns):
        if k > 0 and turn.think_s > 0:
            await asyncio.sleep(turn.think_s * scale)
        messages.append({"role": "user", "content": turn.user_text})
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "max_tokens": turn.max_tokens,
            "temperature": s.temperature,
        }
        if s.ignore_eos:
            body["ignore_eos"] = True
        headers = {"x-ppd-policy": policy, "x-ppd-conversation": f"{nonce}-{conv.conv_id}"}
        res = await stream_request(client, url, body, headers, chat=True)
        rm = M.request_metrics(res.timing(), scale)
        usage = res.usage or {}
        out.append(
            RequestRecord(
                conv.conv_id,
                conv.kind,
                k,
                (res.arrival_s - t0) / scale,
                rm.ttft_ms,
                rm.tpot_ms,
                rm.e2e_ms,
                rm.n_tokens,
                usage.get("prompt_tokens"),
                (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
                res.route,
                res.ok,
                res.error,
            )
        )
        bar.update(1)
        if not res.ok:
            return  # the conversation cannot go on without the answer
        messages.append({"role": "assistant", "content": res.text})


def _stats(recs: Sequence[RequestRecord], slo: M.Slo, duration_s: float) -> dict[str, Any]:
    ok = [r for r in recs if r.ok]
    ms = [M.RequestMetrics(r.ttft_ms, r.tpot_ms, r.e2e_ms, r.output_tokens) for r in ok]
    routes = Counter(r.route for r in ok)
    return {
        "requests": len(recs),
        "ok": len(ok),
        "errors": len(recs) - len(ok),
        "duration_s": duration_s,
        "achieved_rps": len(recs) / duration_s if duration_s > 0 else None,
        "goodput_rps": M.goodput_rps(ms, duration_s, slo) if ms else 0.0,
        "slo_attainment": (sum(M.meets_slo(m, slo) for m in ms) / len(recs)) if recs else None,
        "ttft_p50_ms": M.percentile((r.ttft_ms for r in ok), 50),
        "ttft_p99_ms": M.percentile((r.ttft_ms for r in ok), 99),
        "tpot_p50_ms": M.percentile((r.tpot_ms for r in ok), 50),
        "tpot_p99_ms": M.percentile((r.tpot_ms for r in ok), 99),
        "e2e_p50_ms": M.percentile((r.e2e_ms for r in ok), 50),
        "e2e_p99_ms": M.percentile((r.e2e_ms for r in ok), 99),
        "route_share": {k or "unknown": v / len(ok) for k, v in routes.items()} if ok else {},
    }


async def replay_policy(
    client,
    url: str,
    model: str,
    convs: Sequence[Conversation],
    policy: str,
    s: ReplaySettings,
    desc: str,
    progress: bool,
) -> tuple[dict[str, Any], list[RequestRecord]]:
    # a fresh salt per run as well: an earlier replay on the same long-lived servers must not pre-warm these prompts
    # (seen on 2xH200: the same seed's prompts replayed at a second rate were all cached); --seed still fixes the
    # workload's shape (lengths, arrivals, think times), which is what makes runs comparable
    salt = random.SystemRandom().getrandbits(32)
    nonce = f"{policy}-{s.seed}-{random.Random(f'{desc}-{policy}-{s.seed}').getrandbits(40):010x}-{salt:08x}"
    out: list[RequestRecord] = []
    total = sum(len(c.turns) for c in convs)
    with tqdm(total=total, desc=f"{desc} {policy}", disable=not progress, unit="req", dynamic_ncols=True) as bar:
        t0 = time.perf_counter()
        await asyncio.gather(*(_conversation(client, url, model, c, policy, nonce, s, t0, out, bar) for c in convs))
        duration = (time.perf_counter() - t0) / s.time_scale
    slo = M.Slo(s.slo_ttft_ms, s.slo_tpot_ms)
    summary = _stats(out, slo, duration)
    kinds = sorted({r.kind for r in out})
    if len(kinds) > 1:
        summary["by_kind"] = {k: _stats([r for r in out if r.kind == k], slo, duration) for k in kinds}
    return summary, out


async def run_replay(
    url: str,
    scenarios: dict[str, list[Conversation]],
    s: ReplaySettings,
    out_dir: pathlib.Path,
    name: str = "replay",
    run_config: dict[str, Any] | None = None,
    progress: bool = True,
    echo=print,
    flush_caches: bool = False,
) -> dict[str, Any]:
    from experiments.plots import replay_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    start = datetime.datetime.now().isoformat(timespec="seconds")
    doc: dict[str, Any] = {
        "config": {**(run_config or {}), "settings": asdict(s)},
        "start_time": start,
        "scenarios": {},
        "requests": {},
    }
    async with make_client() as client:
        model = await model_id(client, url)
        doc["config"]["model"] = model
        policies, refused = await probe_policies(client, url, model, s.policies)
        if refused:
            echo("skipping policies the router refused: " + "; ".join(f"{k}: {v}" for k, v in refused.items()))
        doc["config"]["policies_measured"] = policies
        doc["config"]["policies_skipped"] = refused
        for scen, convs in scenarios.items():
            entry: dict[str, Any] = {
                "scenario": scen,
                "conversations": len(convs),
                "requests": sum(len(c.turns) for c in convs),
                "request_rate": s.request_rate,
                "slo_ttft_ms": s.slo_ttft_ms,
                "slo_tpot_ms": s.slo_tpot_ms,
                "policies": {},
            }
            samples: dict[str, dict[str, list[float]]] = {}
            doc["requests"][scen] = {}
            for p in policies:
                if flush_caches:
                    flushed = await flush_server_caches(client, url)
                    doc["config"].setdefault("cache_flushes", []).append(
                        {"scenario": scen, "policy": p, "flushed": flushed}
                    )
                    if not all(flushed.values()):
                        echo(f"{scen}/{p}: cache flush refused by {[u for u, ok in flushed.items() if not ok]}")
                summary, recs = await replay_policy(client, url, model, convs, p, s, scen, progress)
                if summary["ok"] == 0:
                    err = next((r.error for r in recs if r.error), "no answer")
                    echo(f"{scen}/{p}: every request failed ({err[:200]}); policy left out")
                    entry.setdefault("policies_failed", {})[p] = err[:300]
                    continue
                entry["policies"][p] = summary
                samples[p] = {
                    "ttft_ms": [r.ttft_ms for r in recs if r.ok],
                    "tpot_ms": [r.tpot_ms for r in recs if r.ok],
                }
                doc["requests"][scen][p] = [asdict(r) for r in recs]
            doc["scenarios"][scen] = entry
            if entry["policies"]:
                replay_plots(entry, samples, out_dir / f"{name}_{scen}.png")
    doc["end_time"] = datetime.datetime.now().isoformat(timespec="seconds")
    doc = _clean(doc)
    (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=1))
    (out_dir / f"{name}.md").write_text(replay_markdown(doc, name))
    return doc


def _fmt(x: Any, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def replay_markdown(doc: dict[str, Any], name: str) -> str:
    cfg = doc["config"]
    st = cfg["settings"]
    lines = [
        f"# Replay `{name}`",
        "",
        f"- run: {doc['start_time']} .. {doc.get('end_time')}",
    ]
    if cfg.get("command"):
        lines.append(f"- command: `{cfg['command']}`")
    lines.append(
        f"- request rate {st['request_rate']} req/s, SLO TTFT <= {st['slo_ttft_ms']} ms and TPOT <= {st['slo_tpot_ms']} ms, "
        f"time_scale {st['time_scale']} (all times emulated: wall / time_scale), seed {st['seed']}"
    )
    for note in cfg.get("notes", []):
        lines.append(f"- {note}")
    for scen, e in doc["scenarios"].items():
        lines += [
            "",
            f"## {scen} ({e['conversations']} conversations, {e['requests']} requests)",
            "",
            "| policy | ok/total | goodput req/s | SLO met | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | routes |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in ordered(e["policies"]):
            v = e["policies"][p]
            routes = ", ".join(f"{k} {100 * x:.0f}%" for k, x in sorted(v["route_share"].items()))
            lines.append(
                f"| {p} | {v['ok']}/{v['requests']} | {_fmt(v['goodput_rps'], 3)} | {_fmt(100 * (v['slo_attainment'] or 0), 0)}% "
                f"| {_fmt(v['ttft_p50_ms'])} | {_fmt(v['ttft_p99_ms'])} | {_fmt(v['tpot_p50_ms'])} | {_fmt(v['tpot_p99_ms'])} | {routes} |"
            )
        by_kind = [(p, e["policies"][p].get("by_kind")) for p in ordered(e["policies"])]
        if any(bk for _, bk in by_kind):
            lines += [
                "",
                "| policy | kind | requests | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 |",
                "|---|---|---|---|---|---|---|",
            ]
            for p, bk in by_kind:
                for kind, v in (bk or {}).items():
                    lines.append(
                        f"| {p} | {kind} | {v['requests']} | {_fmt(v['ttft_p50_ms'])} | {_fmt(v['ttft_p99_ms'])} "
                        f"| {_fmt(v['tpot_p50_ms'])} | {_fmt(v['tpot_p99_ms'])} |"
                    )
        if e.get("policies_failed"):
            lines.append("")
            lines += [f"- {p} failed: {err}" for p, err in e["policies_failed"].items()]
        lines += ["", f"![{scen}]({name}_{scen}.png)"]
    return "\n".join(lines) + "\n"
