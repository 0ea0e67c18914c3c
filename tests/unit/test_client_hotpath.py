"""The router's backend client on its hot path: pre-encoded bodies, byte-level SSE splitting, filtered /metrics."""

from __future__ import annotations

import json

import httpx
from httpx_transport import HttpxTransport

from ppd.sglang.client import SGLangClient, dumps, loads, parse_metrics


def test_dumps_matches_json_and_falls_back():
    body = {"input_ids": [1, 2, 3], "sampling_params": {"stop": ["é\n"]}, "bootstrap_room": 2**63 - 1}
    assert json.loads(dumps(body)) == body
    big = {"x": 2**70}  # beyond orjson's 64-bit ints: json takes it
    assert json.loads(dumps(big)) == big
    assert loads(dumps(big)) == big


def test_parse_metrics_ignores_other_families():
    text = (
        "# HELP sglang:num_running_reqs running\n"
        "# TYPE sglang:num_running_reqs gauge\n"
        'sglang:num_running_reqs{dp="0"} 3\n'
        'sglang:num_running_reqs{dp="1"} 2\n'
        "# TYPE sglang:num_running_reqs_hist histogram\n"
        'sglang:num_running_reqs_hist_bucket{le="1.0"} 40\n'
        "sglang:num_running_reqs_hist_count 40\n"
        "sglang:num_running_reqs_hist_sum 99\n"
        "# TYPE sglang:num_queue_reqs gauge\n"
        "sglang:num_queue_reqs 7\n"
        "# TYPE sglang:max_total_num_tokens gauge\n"
        "sglang:max_total_num_tokens\t1000\n"
    )
    m = parse_metrics(text)
    assert (m.running_reqs, m.queued_reqs, m.max_total_tokens) == (5, 7, 1000)


async def test_stream_lines_split_across_reads_and_body_sent_as_given():
    events = [{"output_ids": list(range(k + 1)), "meta_info": {"completion_tokens": k + 1}} for k in range(3)]
    wire = b"".join(b"data: " + json.dumps(e).encode() + b"\r\n\r\n" for e in events) + b"data: [DONE]\n\n"
    seen: list[bytes] = []

    class Pieces(httpx.AsyncByteStream):
        async def __aiter__(self):
            for i in range(0, len(wire), 7):  # a line arrives in many reads
                yield wire[i : i + 7]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        assert request.headers["content-type"] == "application/json"
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Pieces())

    net = HttpxTransport(httpx.MockTransport(handler))
    client = SGLangClient(net)
    payload = dumps({"input_ids": [5, 6], "stream": True})
    async with client.generate_batches("http://b", payload) as batches:
        outs = [o async for batch in batches for o in batch]
    last = await client.last_of("http://b", client.generate_batches("http://b", {"input_ids": [5, 6], "stream": True}))
    await net.aclose()
    assert [o.output_ids for o in outs] == [[0], [0, 1], [0, 1, 2]]
    assert last.output_ids == [0, 1, 2]
    assert seen[0] == payload and json.loads(seen[1]) == {"input_ids": [5, 6], "stream": True}
