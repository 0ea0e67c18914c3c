"""SGLang 0.5.10.post1 HTTP protocol as the router uses it: /generate bodies, PD bootstrap fields, stream chunks.

P-route bodies match sglang-router 0.3.2's mini_lb (`sglang_router/mini_lb.py`) field for field: the same body, with
`bootstrap_host` (the prefill server's hostname), `bootstrap_port` (its --disaggregation-bootstrap-port) and
`bootstrap_room` (random 63-bit), POSTed concurrently to the prefill and the decode server.

D-route (local append) bodies carry the same bootstrap fields with `bootstrap_host = LOCAL_APPEND_HOST`. A PD decode
server refuses a request without `bootstrap_room`, and `bootstrap_host` travels with the request into the scheduler
(the way SGLang's own FAKE_BOOTSTRAP_HOST does), so the marker reaches our decode-side extension without new fields.
"""

from __future__ import annotations

import functools
import json
import random
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

SGLANG_VERSION = "0.5.10.post1"
SGLANG_ROUTER_VERSION = "0.3.2"
LOCAL_APPEND_HOST = "ppd-local-append"
SSE_DONE = "[DONE]"

# Prometheus names SGLang's scheduler exports (observability/metrics_collector.py).
METRIC_RUNNING = "sglang:num_running_reqs"
METRIC_QUEUED = "sglang:num_queue_reqs"
METRIC_TOKEN_USAGE = "sglang:token_usage"
METRIC_USED_TOKENS = "sglang:num_used_tokens"
METRIC_MAX_TOTAL_TOKENS = "sglang:max_total_num_tokens"
METRIC_CACHE_HIT_RATE = "sglang:cache_hit_rate"
METRIC_GEN_THROUGHPUT = "sglang:gen_throughput"
METRIC_DECODE_SUM_SEQ_LENS = "sglang:decode_sum_seq_lens"
METRIC_PROMPT_TOKENS_TOTAL = "sglang:prompt_tokens_total"
METRIC_GENERATION_TOKENS_TOTAL = "sglang:generation_tokens_total"


def new_bootstrap_room() -> int:
    return random.getrandbits(63)  # what random.randint(0, 2**63 - 1) draws, without its argument checks


def new_rid() -> str:
    """A request id: 128 random bits as 32 hex digits, like uuid4().hex. Only unique, not secret (the servers key
    requests and /abort_request by it), so Python's generator rather than uuid4's os.urandom, a system call on the
    path to the first token."""
    return f"{random.getrandbits(128):032x}"


def generate_body(
    input_ids: list[int], sampling_params: dict[str, Any], stream: bool, rid: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"input_ids": list(input_ids), "sampling_params": dict(sampling_params), "stream": stream}
    if rid is not None:
        body["rid"] = rid
    return body


@functools.lru_cache(maxsize=256)  # a handful of prefill URLs, asked once per P-route request
def bootstrap_hostname(url: str) -> str:
    """mini_lb: the prefill URL's hostname, IPv6 wrapped in brackets."""
    host = urllib.parse.urlparse(url).hostname or ""
    return f"[{host}]" if ":" in host else host


def with_bootstrap(body: dict[str, Any], bootstrap_host: str, bootstrap_port: int, room: int) -> dict[str, Any]:
    """The P-route body: exactly mini_lb's `modified_request.update({...})` for a single request."""
    out = dict(body)
    out.update({"bootstrap_host": bootstrap_host, "bootstrap_port": bootstrap_port, "bootstrap_room": room})
    return out


def local_append(body: dict[str, Any], room: int) -> dict[str, Any]:
    """The D-route body: decode server only, marked as a local append."""
    return with_bootstrap(body, LOCAL_APPEND_HOST, 0, room)


def is_local_append(body: dict[str, Any]) -> bool:
    return body.get("bootstrap_host") == LOCAL_APPEND_HOST


def finish_reason_to_openai(reason: dict[str, Any] | None) -> str | None:
    """SGLang's finish_reason ({"type": "length"|"stop"|"abort", ...}) to OpenAI's string."""
    if reason is None:
        return None
    kind = reason.get("type")
    if kind == "length":
        return "length"
    if kind == "stop":
        return "stop"
    return "abort"


@dataclass
class GenerateOutput:
    """One /generate response or stream chunk. In a stream, `output_ids` is cumulative (SGLang's default) or only the
    new ids (`--incremental-streaming-output`); `client.DeltaIds` reads either."""

    output_ids: list[int]
    meta_info: dict[str, Any] = field(default_factory=dict)
    text: str = ""

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> GenerateOutput:
        return cls(
            output_ids=list(obj.get("output_ids") or []),
            meta_info=obj.get("meta_info") or {},
            text=obj.get("text") or "",
        )

    @property
    def finish_reason(self) -> dict[str, Any] | None:
        return self.meta_info.get("finish_reason")

    @property
    def prompt_tokens(self) -> int:
        return int(self.meta_info.get("prompt_tokens", 0))

    @property
    def completion_tokens(self) -> int:
        return int(self.meta_info.get("completion_tokens", len(self.output_ids)))

    @property
    def cached_tokens(self) -> int:
        return int(self.meta_info.get("cached_tokens", 0))


def parse_sse_line(line: str) -> GenerateOutput | None:
    """One `data: {...}` line of a /generate stream; None for blank lines and `data: [DONE]`."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == SSE_DONE or not payload:
        return None
    return GenerateOutput.from_json(json.loads(payload))


def sse_chunk(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE_CHUNK = b"data: [DONE]\n\n"
