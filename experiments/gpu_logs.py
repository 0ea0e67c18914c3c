"""Read the GPU run's raw logs (SGLang servers, router) into small files that can live in the repo.

    python -m experiments.gpu_logs keylines --logs RUN/logs --out results/h200x2/logs
    python -m experiments.gpu_logs timings  --logs RUN/logs --results RUN/results --out results/h200x2/analysis

`keylines`: per log, the lines that say what ran (the exec line, server start and warm-up, KV pool size, the decode
extension's patch lines, Mooncake's transport lines, warnings and errors), repeated lines collapsed with a count, plus
a per-phase summary of SGLang's "Decode batch" lines (running / pre-allocated / transferring / retracted requests).

`timings`: SGLang's own per-request "Req Time Stats" (`--enable-request-time-stats-logging`) of the last prefill and
decode server logs, joined to the router's decision lines: for every P-route request the receipt lag (router decision
to the prefill scheduler's bootstrap-queue entry), the prefill forward + KV transfer, the transfer alone, and the time
until the decode server had the KV; per phase of the run (each sweep and replay, from their result files) the KV
transfer rate SGLang measured. Server clocks are `time.perf_counter` (CLOCK_MONOTONIC, shared by all processes), the
router logs wall time; their offset is the one that puts most router decisions just before a prefill-server receipt of
the same prompt length.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import csv
import datetime
import json
import pathlib
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

KEY_PATTERNS = (
    r"\[ppd launch\] exec",
    r"ppd\.sglang\.ext",
    r"Load weight end|KV Cache is allocated|max_total_num_tokens|Capture cuda graph end",
    r"disaggregation warmup|fired up and ready",
    r"transfer_engine|Transfer Engine|topology\.cpp|intranode_nvlink|IB devices|Mooncake|mooncake",
    r"Traceback|Error|ERROR|Exception|exception|WARNING|Warning|warn|refus|abort|timed out|Timeout",
    r"Uvicorn running|healthy|calibration",
    r"Starting|listening|Listening|router_args|PD disaggregation|workers",
)
NOISE = ("FastAPIDeprecationWarning", "from sglang.srt.utils.json_response")
_KEY_RE = re.compile("|".join(KEY_PATTERNS))
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
_TS_RE = re.compile(r"^\[\d{4}-\d\d-\d\d (\d\d:\d\d:\d\d)\] ")
_DECODE_BATCH_RE = re.compile(
    r"Decode batch, #running-req: (\d+), #token: (\d+), token usage: ([\d.]+), pre-allocated usage: ([\d.]+), "
    r"#prealloc-req: (\d+), #transfer-req: (\d+), #retracted-req: (\d+).*#queue-req: (\d+)"
)
_REQ_RE = re.compile(
    r"rid=(\w+), bootstrap_room=(\d+), input len=(\d+), output len=(\d+), type=(\w+)\): (.*)start=([\d.]+)"
)
_DUR_RE = re.compile(r"(\w+)[=(]([\d.]+)ms")
_XFER_RE = re.compile(r"transfer_speed=([\d.]+)GB/s, transfer_total=([\d.]+)MB")
_DECISION_RE = re.compile(r"^(\S+ \S+) INFO router\.routing: decision route=(\w+) policy=(\w+) .* L=(\d+) m=(\d+)")


def _norm(line: str) -> str:
    """A line with its timestamps, numbers and ids blanked: repeated messages collapse to one."""
    line = _TS_RE.sub("", line)
    line = re.sub(r"^[IWE]\d{4} [\d:.]+ +\d+ ", "", line)
    return re.sub(r"0x[0-9a-f]+|[0-9a-f]{16,}|\d+(\.\d+)?", "#", line)


def key_lines(lines: Iterable[str], max_len: int = 400) -> list[str]:
    """The lines worth keeping, in order, each repeated message once with its count (first occurrence shown)."""
    kept: dict[str, list] = {}
    for line in lines:
        line = _ANSI_RE.sub("", line.rstrip("\n"))
        if not _KEY_RE.search(line) or any(n in line for n in NOISE):
            continue
        k = _norm(line)
        if k in kept:
            kept[k][1] += 1
        else:
            kept[k] = [line if len(line) <= max_len else line[:max_len] + f" ... [{len(line)} chars]", 1]
    return [text if n == 1 else f"{text}   [x{n} similar]" for text, n in kept.values()]


@dataclass(frozen=True)
class Phase:
    name: str
    start: str  # HH:MM:SS, inclusive
    end: str

    def holds(self, hms: str) -> bool:
        return self.start <= hms <= self.end


def decode_batch_summary(lines: Iterable[str], phases: Sequence[Phase]) -> list[dict[str, Any]]:
    """Per phase, the largest values SGLang's decode server logged every 40 decode steps."""
    acc: dict[str, dict[str, float]] = {p.name: collections.defaultdict(float) for p in phases}
    for line in lines:
        m = _DECODE_BATCH_RE.search(line)
        ts = _TS_RE.match(line)
        if not m or not ts:
            continue
        for p in phases:
            if p.holds(ts.group(1)):
                a = acc[p.name]
                a["lines"] += 1
                for name, v in zip(
                    ("running", "tokens", "token_usage", "prealloc_usage", "prealloc_req", "transfer_req",
                     "retracted_req", "queue_req"),
                    m.groups(),
                    strict=True,
                ):  # fmt: skip
                    a[name] = max(a[name], float(v))
    return [{"phase": p.name, **acc[p.name]} for p in phases if acc[p.name]["lines"]]


# --- per-request timings ---


@dataclass
class ReqStats:
    rid: str
    input_len: int
    output_len: int
    kind: str  # prefill | decode
    start: float  # server clock (s)
    logged: str  # HH:MM:SS of the log line (completion)
    ms: dict[str, float] = field(default_factory=dict)
    transfer_gib_s: float | None = None
    transfer_mib: float | None = None
    room: int = 0  # bootstrap_room: the same on the prefill and the decode server for one PD request

    @property
    def transfer_ms(self) -> float | None:
        """SGLang's transfer latency (prefill server): last chunk's entry into the transfer queue to completion."""
        if not self.transfer_gib_s or self.transfer_mib is None:
            return None
        return self.transfer_mib / 1024 / self.transfer_gib_s * 1e3


def req_stats(lines: Iterable[str]) -> list[ReqStats]:
    out = []
    for line in lines:
        if "Req Time Stats" not in line or "HEALTH_CHECK" in line:
            continue
        m = _REQ_RE.search(line)
        ts = _TS_RE.match(line)
        if not m or not ts:
            continue
        r = ReqStats(m[1], int(m[3]), int(m[4]), m[5], float(m[7]), ts.group(1), room=int(m[2]))
        r.ms = {k: float(v) for k, v in _DUR_RE.findall(m[6])}
        x = _XFER_RE.search(line)
        if x:
            r.transfer_gib_s, r.transfer_mib = float(x[1]), float(x[2])
        out.append(r)
    return out


@dataclass(frozen=True)
class Decision:
    wall_s: float
    hms: str
    route: str
    policy: str
    cached: int  # L in the router's index of the decode server
    append: int

    @property
    def prompt_tokens(self) -> int:
        return self.cached + self.append


def decisions(lines: Iterable[str]) -> list[Decision]:
    out = []
    for line in lines:
        m = _DECISION_RE.match(line)
        if m:
            t = datetime.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f")
            out.append(Decision(t.timestamp(), t.strftime("%H:%M:%S"), m[2], m[3], int(m[4]), int(m[5])))
    return out


def clock_offset(decs: Sequence[Decision], prefill: Sequence[ReqStats], window_s: float = 0.03) -> float:
    """wall - monotonic: the offset that puts the most P-route decisions within `window_s` before a prefill receipt of
    a prompt of the same length (the mode of the lag distribution; the decision precedes the receipt)."""
    by_len: dict[int, list[float]] = collections.defaultdict(list)
    for r in prefill:
        by_len[r.input_len].append(r.start)
    # appends (a cached prefix) only: their prompt lengths are nearly unique, unlike the background streams'
    cands = [[d.wall_s - s for s in by_len.get(d.prompt_tokens, ())] for d in decs if d.route == "prefill" and d.cached]
    cands = [sorted(c) for c in cands if c]
    best, best_n = 0.0, -1
    for o in sorted({v for c in cands for v in c}):
        n = sum(bisect.bisect_right(c, o + window_s) > bisect.bisect_left(c, o) for c in cands)
        if n > best_n:
            best, best_n = o + window_s, n
    return best


def p_route_rows(decs: Sequence[Decision], prefill: Sequence[ReqStats], decode: Sequence[ReqStats]) -> list[dict]:
    """Every P-route decision matched to the prefill server's record of its prompt (nearest receipt after it)."""
    off = clock_offset(decs, prefill)
    dec_by_rid = {r.rid: r for r in decode}
    free: dict[int, list[ReqStats]] = collections.defaultdict(list)
    for r in prefill:
        free[r.input_len].append(r)
    rows = []
    for d in decs:
        if d.route != "prefill":
            continue
        cands = [
            (r.start - (d.wall_s - off), r) for r in free.get(d.prompt_tokens, ()) if r.start - (d.wall_s - off) > -0.05
        ]
        if not cands:
            continue
        lag, p = min(cands, key=lambda c: c[0])
        if lag > 3.0:
            continue
        free[d.prompt_tokens].remove(p)
        dr = dec_by_rid.get(p.rid)
        ready = None
        if dr is not None and dr.start > 0:
            ready = sum(dr.ms.get(k, 0.0) for k in ("prealloc_queue_duration", "transfer_duration", "queue_duration"))
        rows.append(
            {
                "time": d.hms,
                "policy": d.policy,
                "cached": d.cached,
                "append": d.append,
                "prompt_tokens": d.prompt_tokens,
                "rid": p.rid,
                "recv_lag_ms": round(lag * 1e3, 1),
                "p_bootstrap_ms": p.ms.get("bootstrap_queue_duration"),
                "p_queue_ms": p.ms.get("queue_duration"),
                "p_forward_and_transfer_ms": p.ms.get("forward_duration"),
                "transfer_ms": round(p.transfer_ms, 1) if p.transfer_ms is not None else None,
                "transfer_gib_s": p.transfer_gib_s,
                "kv_mib": p.transfer_mib,
                "d_kv_ready_ms": round(ready, 1) if ready is not None else None,
            }
        )
    return rows


def cumulative_prefilled(lines: Iterable[str]) -> list[tuple[str, int]]:
    """(HH:MM:SS, tokens prefilled so far) after each "Prefill batch" line of a server."""
    out, total = [], 0
    for line in lines:
        m = re.search(r"Prefill batch, #new-seq: \d+, #new-token: (\d+)", line)
        ts = _TS_RE.match(line)
        if m and ts:
            total += int(m[1])
            out.append((ts.group(1), total))
    return out


def transfer_by_phase(
    prefill: Sequence[ReqStats], phases: Sequence[Phase], cum: Sequence[tuple[str, int]], skip_lens: dict[str, int]
) -> list[dict[str, Any]]:
    """Per phase: SGLang's per-request KV transfer rate on the prefill server (requests moving >= 64 MiB).
    `skip_lens`: per phase a prompt length to leave out (the background streams' prompts, started 32 at once, whose
    completion the prefill scheduler only polls between its forward passes)."""
    rows = []
    for p in phases:
        sel = [
            r
            for r in prefill
            if p.holds(r.logged) and r.transfer_gib_s and (r.transfer_mib or 0) >= 64 and r.input_len != skip_lens.get(p.name)
        ]  # fmt: skip
        if not sel:
            continue
        speeds = sorted(r.transfer_gib_s for r in sel)
        at_end = [n for t, n in cum if t <= p.end]
        rows.append(
            {
                "phase": p.name,
                "window": f"{p.start}-{p.end}",
                "requests": len(sel),
                "median_gib_s": round(statistics.median(speeds), 1),
                "p10_gib_s": round(speeds[len(speeds) // 10], 1),
                "slow_share": round(sum(s < 10 for s in speeds) / len(speeds), 2),
                "slowest_ms_per_gib": round(max(1e3 / s for s in speeds), 0),
                "prefilled_tokens_at_end": at_end[-1] if at_end else 0,
            }
        )
    return rows


def phases_from_results(results: pathlib.Path) -> tuple[list[Phase], dict[str, int]]:
    """One phase per sweep / replay output under `results`, named by its folder (their own start and end times)."""
    phases, skip = [], {}
    for path in sorted(results.rglob("*.json")):
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or "start_time" not in doc or "end_time" not in doc:
            continue
        name = path.parent.relative_to(results).as_posix()
        hms = [datetime.datetime.fromisoformat(doc[k]).strftime("%H:%M:%S") for k in ("start_time", "end_time")]
        phases.append(Phase(name, *hms))
        st = (doc.get("config") or {}).get("settings") or {}
        if any(n > 0 for n in st.get("background_streams") or ()):
            skip[name] = int(st.get("bg_prompt_tokens") or 0)
    return sorted(phases, key=lambda p: p.start), skip


def sweep_p_route(doc: dict[str, Any], rows: Sequence[dict[str, Any]], phase: Phase) -> list[dict[str, Any]]:
    """The sweep's measured P-route appends with the servers' view of them: a record is paired with the router
    decision of the same policy and (cached, appended) tokens inside the sweep's window, in order of load level."""
    by_key: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in rows:
        if phase.holds(r["time"]) and r["cached"]:
            by_key[(r["policy"], r["cached"], r["append"])].append(r)
    recs = [r for r in doc["results"] if r.get("ok") and r.get("route") == "prefill"]
    recs.sort(key=lambda r: (r["test_case"].get("background_streams", 0), r["test_case"]["context_length"]))
    out = []
    for r in recs:
        tc, m, ro = r["test_case"], r["metrics"], r.get("router") or {}
        key = (r["policy"], int(ro.get("decode_cached_tokens") or 0), int(ro.get("append_tokens") or 0))
        srv = by_key[key].pop(0) if by_key.get(key) else {}
        lag, ready = srv.get("recv_lag_ms"), srv.get("d_kv_ready_ms")
        rt = m.get("router_ttft_ms")
        out.append(
            {
                "N": tc.get("background_streams", 0),
                "L": tc["context_length"],
                "m": tc["append_length"],
                "policy": r["policy"],
                "ttft_ms": round(m["ttft_ms"], 1),
                "router_ttft_ms": round(rt, 1) if rt is not None else None,
                "recv_lag_ms": lag,
                "p_forward_and_transfer_ms": srv.get("p_forward_and_transfer_ms"),
                "transfer_ms": srv.get("transfer_ms"),
                "d_kv_ready_ms": ready,
                "rest_ms": round(rt - lag - ready, 1) if None not in (rt, lag, ready) else None,
                "time": srv.get("time"),
            }
        )
    return out


def md_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(none)\n"
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join("" if r.get(k) is None else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _read(path: pathlib.Path) -> list[str]:
    return path.read_text(errors="replace").splitlines()


def cmd_keylines(args: argparse.Namespace) -> int:
    logs, out = pathlib.Path(args.logs), pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    phases, _ = phases_from_results(pathlib.Path(args.results)) if args.results else ([], {})
    for path in sorted(logs.glob("*.log")):
        lines = _read(path)
        kept = key_lines(lines)
        summary = decode_batch_summary(lines, phases) if phases and path.name.startswith("decode") else []
        text = [f"# key lines of {path.name} ({len(lines)} lines, {path.stat().st_size} bytes): python -m "
                f"experiments.gpu_logs keylines", *kept]  # fmt: skip
        if summary:
            text += ["", "# Decode batch lines per phase (largest values):", md_table(summary)]
        (out / f"{path.stem}.keylines.txt").write_text("\n".join(text) + "\n")
        print(f"{path.name}: {len(kept)} key lines")
    return 0


def cmd_timings(args: argparse.Namespace) -> int:
    logs, out = pathlib.Path(args.logs), pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prefill_log = sorted(logs.glob("prefill-0.*.log"))[-1]
    decode_log = sorted(logs.glob("decode-0.*.log"))[-1]
    router_log = sorted(logs.glob("router.*.log"))[-1]
    p_lines = _read(prefill_log)
    prefill = [r for r in req_stats(p_lines) if r.kind == "prefill"]
    decode = [r for r in req_stats(_read(decode_log)) if r.kind == "decode"]
    rows = p_route_rows(decisions(_read(router_log)), prefill, decode)
    with open(out / "p_route_requests.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["time"])
        w.writeheader()
        w.writerows(rows)
    phases, skip = phases_from_results(pathlib.Path(args.results))
    by_phase = transfer_by_phase(prefill, phases, cumulative_prefilled(p_lines), skip)
    (out / "transfer_by_phase.md").write_text(
        f"KV transfer rate per request as SGLang's prefill server logged it ({prefill_log.name}, "
        "`transfer_speed`, GiB/s), requests moving >= 64 MiB; background-stream prompts left out where 32 start at "
        "once. prefilled_tokens_at_end: tokens the prefill server had prefilled since its start (its KV pool holds "
        "788,603).\n\n" + md_table(by_phase)
    )
    for p in phases:
        doc_path = pathlib.Path(args.results) / p.name / "sweep.json"
        if doc_path.exists() and any(p.holds(r["time"]) for r in rows):
            table = sweep_p_route(json.loads(doc_path.read_text()), rows, p)
            (out / f"{p.name.replace('/', '-')}_p_route.md").write_text(
                f"P-route appends of `{p.name}` ({p.start}-{p.end}) with the servers' view. ttft_ms: client; "
                "router_ttft_ms: the router's; recv_lag_ms: router decision to the prefill scheduler's receipt; "
                "p_forward_and_transfer_ms: prefill server, forward start to KV transfer done; transfer_ms: its "
                "transfer part; d_kv_ready_ms: decode server, arrival to KV in place (prealloc + transfer wait + "
                "queue); rest_ms = router TTFT - lag - KV ready (first decode step, streaming path).\n\n"
                + md_table(table)
            )
    print(f"{len(rows)} P-route requests -> {out / 'p_route_requests.csv'}; {len(by_phase)} phases")
    print(md_table(by_phase))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(required=True)
    k = sub.add_parser("keylines", help="key lines of every log")
    k.add_argument("--logs", required=True)
    k.add_argument("--results", help="the run's results folder (phases for the decode-batch summary)")
    k.add_argument("--out", required=True)
    k.set_defaults(func=cmd_keylines)
    t = sub.add_parser("timings", help="per-request P-route timings and KV transfer rate per phase")
    t.add_argument("--logs", required=True)
    t.add_argument("--results", required=True)
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_timings)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
