"""experiments.gpu_logs on lines in the exact format SGLang 0.5.10.post1 and our router wrote on the GPU box."""

from __future__ import annotations

import datetime

import pytest

from experiments import gpu_logs as GL

PREFILL = (
    "[2026-11-26 15:34:49] Req Time Stats(rid=067dd14a719841a0a4ce29a2bcdc4708, bootstrap_room=1353841614798855953, "
    "input len=16400, output len=1, type=prefill): bootstrap_queue_duration(4.25ms) = bootstrap(4.24ms) + "
    "alloc_wait(0.01ms); queue_duration=2.12ms, forward_duration=56.71ms, start={start}, transfer_speed=179.16GB/s, "
    "transfer_total=2050.00MB, #retries=0"
)
DECODE = (
    "[2026-11-26 15:34:49] Req Time Stats(rid=067dd14a719841a0a4ce29a2bcdc4708, bootstrap_room=1353841614798855953, "
    "input len=16400, output len=32, type=decode): prealloc_queue_duration(0.76ms) = bootstrap(0.32ms) + "
    "alloc_wait(0.44ms); transfer_duration=60.72ms; queue_duration=0.24ms, forward_duration=367.59ms, start={start}"
)
DECISION = (
    "{wall} INFO router.routing: decision route=prefill policy=prefill reason=fixed r=0.999 prefill=0.0ms[] "
    "decode=infms[] L=16384 m=16"
)


def test_req_stats_parses_both_sides_and_the_transfer():
    (p,) = GL.req_stats([PREFILL.format(start="612.429")])
    assert (p.kind, p.input_len, p.output_len, p.start, p.logged) == ("prefill", 16400, 1, 612.429, "15:34:49")
    assert p.ms["forward_duration"] == 56.71 and p.ms["bootstrap_queue_duration"] == 4.25
    assert p.transfer_ms == pytest.approx(2050.0 / 1024 / 179.16 * 1e3)  # SGLang's GB/s is GiB/s of MiB totals
    (d,) = GL.req_stats([DECODE.format(start="612.432")])
    assert d.kind == "decode" and d.ms["transfer_duration"] == 60.72 and d.transfer_ms is None
    assert GL.req_stats(["[2026-11-26 15:34:49] Req Time Stats(rid=HEALTH_CHECK_1, ...)"]) == []


def test_p_route_rows_join_decision_to_both_servers_through_the_clock_offset():
    wall = datetime.datetime(2026, 11, 26, 15, 34, 48, 642000)
    offset = wall.timestamp() - 612.400  # the router decided 29 ms before the prefill scheduler's receipt
    decs = GL.decisions([DECISION.format(wall=wall.strftime("%Y-%m-%d %H:%M:%S,%f")[:-3])])
    prefill = GL.req_stats([PREFILL.format(start="612.429")])
    decode = GL.req_stats([DECODE.format(start="612.432")])
    assert GL.clock_offset(decs, prefill) == pytest.approx(offset, abs=0.031)
    (row,) = GL.p_route_rows(decs, prefill, decode)
    assert row["cached"] == 16384 and row["append"] == 16
    assert 0 <= row["recv_lag_ms"] <= 30
    assert row["d_kv_ready_ms"] == pytest.approx(0.76 + 60.72 + 0.24, abs=0.1)


def test_key_lines_keep_what_ran_and_collapse_repeats():
    lines = [
        "[2026-11-26 15:32:04] KV Cache is allocated. #tokens: 788603, K size: 48.13 GB, V size: 48.13 GB",
        "[2026-11-26 15:34:20] Decode batch, #running-req: 1, #token: 61, token usage: 0.00",  # not a key line
        *(
            f'[2026-11-26 15:34:5{i}] INFO:     127.0.0.1:5660{i} - "POST /abort_request HTTP/1.1" 200 OK'
            for i in range(3)
        ),
        "\x1b[31mERROR\x1b[0m pd_router: No prefill workers available",
    ]
    kept = GL.key_lines(lines)
    assert kept[0].endswith("V size: 48.13 GB")
    assert kept[1].endswith("[x3 similar]") and "abort_request" in kept[1]
    assert kept[2] == "ERROR pd_router: No prefill workers available"
    assert len(kept) == 3


def test_decode_batch_summary_takes_the_largest_values_per_phase():
    line = (
        "[2026-11-26 15:34:{s}] Decode batch, #running-req: {r}, #token: 1000, token usage: 0.{u}, pre-allocated usage: "
        "0.00, #prealloc-req: 0, #transfer-req: {t}, #retracted-req: 0, cuda graph: True, gen throughput (token/s): "
        "1.0, #queue-req: 0"
    )
    lines = [
        line.format(s="38", r=6, u=10, t=26),
        line.format(s="39", r=32, u=12, t=0),
        line.format(s="59", r=9, u=99, t=9),
    ]
    (row,) = GL.decode_batch_summary(lines, [GL.Phase("load", "15:34:30", "15:34:45")])
    assert (row["lines"], row["running"], row["transfer_req"], row["token_usage"]) == (2, 32, 26, 0.12)
