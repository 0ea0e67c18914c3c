"""The router's live view of a server's load: polled metrics corrected by its own requests since the poll."""

from __future__ import annotations

from ppd.config import ServerConfig
from ppd.prefix_index import PrefixIndex
from ppd.sglang.client import BackendMetrics
from router.backends import Backend


def backend() -> Backend:
    return Backend("decode", 0, ServerConfig(port=1), PrefixIndex())


def polled(b: Backend, running: int, queued: int = 0) -> None:
    """What poll_metrics does: the metrics, and the router's counts when they were asked for."""
    b.metrics, b.has_metrics, b.at_poll = (
        BackendMetrics(running_reqs=running, queued_reqs=queued),
        True,
        (
            b.inflight,
            b.finished,
        ),
    )


def start(b: Backend, n: int = 1) -> None:
    b.inflight += n


def test_traffic_the_router_never_saw_counts():
    """32 streams sent to the decode server directly (or by another router): the router has none open there."""
    b = backend()
    polled(b, running=32)
    assert b.live_counts() == (32, 0)
    assert b.load(256).running_reqs == 32


def test_requests_that_ended_since_the_poll_leave_the_queue_first():
    b = backend()
    start(b, 3)
    polled(b, running=1, queued=2)  # the router's 3: one running, two queued when polled
    b.end_request(100)
    b.end_request(100)
    assert b.live_counts() == (1, 0)
    b.end_request(100)
    assert b.live_counts() == (0, 0)  # no phantom queue or stream until the next poll


def test_requests_started_since_the_poll_count_at_once():
    b = backend()
    polled(b, running=4)  # 4 from elsewhere
    start(b, 2)
    assert b.live_counts() == (6, 0)
    b.end_request(10)
    assert b.live_counts() == (5, 0)


def test_no_metrics_yet_means_no_counts():
    b = backend()
    start(b, 2)
    assert b.live_counts() == (0, 0)  # the cost model then trusts `inflight` (costmodel._queue_wait_ms)
