"""One simulated request: its lengths, its prompt as a segment chain, and the times it passed each stage."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import simpy

from ppd.simulate.kvcache import Segment
from ppd.simulate.trace import TraceRequest


@dataclass(eq=False)
class SimRequest:
    trace: TraceRequest
    segs: tuple[Segment, ...]  # the prompt as a chain of cacheable segments
    out_seg: Segment  # the answer, cached after it finishes (decode / colocated servers)
    finished: simpy.Event
    issue_s: float = 0.0
    route: str = ""
    reason: str = ""
    decode_server: str = ""
    prefill_server: str = ""
    cached_tokens: int = 0  # prefix reused on the server that prefilled it
    decode_cached_tokens: int = 0  # L as the router saw it
    prefill_cached_tokens: int = 0
    enqueue_s: float = math.nan  # after the host-side overhead, when it reached its server
    admitted_s: float = math.nan  # KV reserved on the serving (decode / colocated) server
    prefill_ready_s: float = math.nan  # P-route: KV reserved on the prefill server, queued for its GPU
    prefill_start_s: float = math.nan  # first forward that computed a token of it
    prefill_end_s: float = math.nan
    transfer_start_s: float = math.nan
    transfer_end_s: float = math.nan
    kv_bytes: int = 0  # moved prefill -> decode
    first_token_s: float = math.nan
    last_token_s: float = math.nan
    failed: str = ""  # why it could not be served (e.g. larger than a server's KV)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return self.trace.prompt_tokens

    @property
    def output_tokens(self) -> int:
        return self.trace.output_tokens

    @property
    def done(self) -> bool:
        return not math.isnan(self.last_token_s)

    def record(self) -> dict:
        """Plain per-request row (seconds relative to the simulation start)."""
        t = self.trace
        return {
            "conversation_id": t.conversation_id,
            "turn": t.turn,
            "prompt_tokens": t.prompt_tokens,
            "output_tokens": t.output_tokens,
            "route": self.route,
            "reason": self.reason,
            "decode_server": self.decode_server,
            "prefill_server": self.prefill_server,
            "cached_tokens": self.cached_tokens,
            "decode_cached_tokens": self.decode_cached_tokens,
            "issue_s": self.issue_s,
            "enqueue_s": self.enqueue_s,
            "admitted_s": self.admitted_s,
            "prefill_ready_s": self.prefill_ready_s,
            "prefill_start_s": self.prefill_start_s,
            "prefill_end_s": self.prefill_end_s,
            "transfer_start_s": self.transfer_start_s,
            "transfer_end_s": self.transfer_end_s,
            "first_token_s": self.first_token_s,
            "last_token_s": self.last_token_s,
            "kv_bytes": self.kv_bytes,
            "failed": self.failed,
        }
