"""experiments.router_compare_stats: rooms are assigned to routers by the compare run's rotation, and the paired
statistics are computed round by round."""

from __future__ import annotations

import gzip

from experiments.router_compare_stats import paired, router_path, servers

ROUTERS = ["ours", "ref"]


def _line(room: int, typ: str, rid: str, start: float, n: int = 512, **f: float) -> str:
    if typ == "prefill":
        rest = (
            f"bootstrap_queue_duration({f['bq']:.2f}ms) = bootstrap({f['bq']:.2f}ms) + alloc_wait(0.00ms); "
            f"queue_duration={f['q']:.2f}ms, forward_duration={f['fwd']:.2f}ms, start={start:.3f}"
        )
    else:
        rest = (
            f"prealloc_queue_duration({f['pre']:.2f}ms) = bootstrap(0.10ms) + alloc_wait(0.00ms); "
            f"transfer_duration={f['xfer']:.2f}ms; queue_duration=0.10ms, forward_duration=9.00ms, start={start:.3f}"
        )
    return (
        f"[2026-11-26 23:25:26] Req Time Stats(rid={rid}, bootstrap_room={room}, input len={n}, output len=1, "
        f"type={typ}): {rest}"
    )


def test_servers_assigns_rooms_by_rotation(tmp_path):
    # 2 rounds x 2 routers; round 0: ours, ref; round 1: ref, ours. Ours sends one rid to both servers.
    order = ["ours", "ref", "ref", "ours"]
    p_lines, d_lines = [], []
    for i, who in enumerate(order):
        late_ms = 1.0 if who == "ours" else 0.0  # ours' prefill half arrives 1 ms after its decode half
        rid_p, rid_d = (f"r{i}", f"r{i}") if who == "ours" else (f"p{i}", f"d{i}")
        p_lines.append(_line(100 + i, "prefill", rid_p, start=10.0 + i, bq=1.0, q=0.2, fwd=20.0))
        d_lines.append(_line(100 + i, "decode", rid_d, start=10.0 + i, pre=0.5, xfer=20.7 + late_ms))
    p_lines.append(_line(999, "prefill", "HEALTH_CHECK_1", start=50.0, bq=1, q=1, fwd=1))
    (tmp_path / "prefill-0.0.log.gz").write_bytes(gzip.compress("\n".join(p_lines).encode()))
    (tmp_path / "decode-0.0.log").write_text("\n".join(d_lines))
    rows = {r["router"]: r for r in servers(tmp_path, reps=2, routers=ROUTERS)}
    assert rows["ours"]["same_rid_both_servers"] == 2 and rows["ref"]["same_rid_both_servers"] == 0
    assert rows["ours"]["skew_ms"] == 1.0 and rows["ref"]["skew_ms"] == 0.0


def test_paired_differences_round_by_round():
    doc = {"rounds": {"ours@512": [10.0, 12.0, None, 11.0], "ref@512": [11.0, 11.0, 9.0, 13.0]}}
    (row,) = paired(doc, resamples=200)
    assert row["rounds"] == 3 and row["ours_minus"] == "ref"
    assert row["paired_median_ms"] == -1.0 and row["ours_faster_rounds"] == 2
    assert row["ci95_low_ms"] <= -1.0 <= row["ci95_high_ms"]


def test_paired_pools_runs_pairing_within_each():
    """Rounds pair within their own run; a router only one run timed is compared over that run alone."""
    a = {"rounds": {"ours@512": [10.0, 10.0], "ref@512": [11.0, 12.0], "old@512": [9.0, 9.0]}}
    b = {"rounds": {"ours@512": [20.0, 20.0, 20.0], "ref@512": [19.0, 21.0, 22.0]}}
    rows = {r["ours_minus"]: r for r in paired([a, b], resamples=200)}
    assert rows["ref"]["runs"] == 2 and rows["ref"]["rounds"] == 5
    assert rows["ref"]["paired_median_ms"] == -1.0  # diffs -1, -2, +1, -1, -2
    assert rows["ref"]["ours_faster_rounds"] == 4
    assert rows["old"]["runs"] == 1 and rows["old"]["rounds"] == 2 and rows["old"]["paired_median_ms"] == 1.0


def test_router_path_pools_each_phase():
    run = {"router_ms_rounds": {"ours@512": [{"dispatch": 0.5, "relay": 0.2}, None, {"dispatch": 0.7, "relay": None}]}}
    other = {"router_ms_rounds": {"ours@512": [{"dispatch": 0.6, "relay": 0.1}]}}
    rows = {r["phase"]: r for r in router_path([run, other])}
    assert rows["dispatch"]["requests"] == 3 and rows["dispatch"]["median_ms"] == 0.6
    assert rows["relay"]["requests"] == 2 and rows["relay"]["median_ms"] == 0.15
    assert router_path([{"rounds": {}}]) == []  # a build before router_ms


def test_servers_follows_the_runs_own_orders(tmp_path):
    """A shuffled run's JSON names each round's order; lengths the run did not time (an earlier run's, still in the
    servers' logs) are left out."""
    orders = {"512": [["ref", "ours"], ["ours", "ref"]]}
    p_lines, d_lines = [], []
    for i in range(3):  # an earlier run's request at another length
        p_lines.append(_line(50 + i, "prefill", f"x{i}", start=1.0 + i, n=2048, bq=1, q=0.2, fwd=20))
        d_lines.append(_line(50 + i, "decode", f"y{i}", start=1.0 + i, n=2048, pre=0.5, xfer=20))
    for i, who in enumerate(["ref", "ours", "ours", "ref"]):
        late_ms = 2.0 if who == "ours" else 0.0
        rid_p, rid_d = (f"r{i}", f"r{i}") if who == "ours" else (f"p{i}", f"d{i}")
        p_lines.append(_line(100 + i, "prefill", rid_p, start=10.0 + i, bq=1.0, q=0.2, fwd=20.0))
        d_lines.append(_line(100 + i, "decode", rid_d, start=10.0 + i, pre=0.5, xfer=20.7 + late_ms))
    (tmp_path / "prefill-0.0.log").write_text("\n".join(p_lines))
    (tmp_path / "decode-0.0.log").write_text("\n".join(d_lines))
    rows = servers(tmp_path, reps=2, routers=ROUTERS, orders=orders)
    assert {r["prompt_tokens"] for r in rows} == {512}
    by = {r["router"]: r for r in rows}
    assert by["ours"]["same_rid_both_servers"] == 2 and by["ours"]["skew_ms"] == 2.0 and by["ref"]["skew_ms"] == 0.0
