"""The request trace: what the simulator consumes, what the generators produce, what a replay can send.

One JSON object per line (JSONL), one line per turn:

    {"arrival_s": 0.0, "prompt_tokens": 2310, "output_tokens": 120, "conversation_id": "rag-0-3", "turn": 0,
     "think_s": 0.0, "prefix_id": "doc-2", "prefix_tokens": 2250}

- `prompt_tokens` is the whole prompt the model sees (history + new message), `output_tokens` the answer's length.
- Turn k of a conversation extends turn k-1: its prompt starts with turn k-1's prompt and answer, so
  `prompt_tokens[k] - prompt_tokens[k-1] - output_tokens[k-1]` is the new message (a prompt shorter than that starts a
  fresh history). This is what makes multi-turn prefix caching visible to the simulator.
- Issue time: turn 0 is sent at `arrival_s`; turn k > 0 at max(`arrival_s`, answer of turn k-1 + `think_s`), i.e. a
  user never sends before the previous answer has finished. `arrival_s` alone gives an open-loop schedule, `think_s`
  alone (arrival_s = the conversation's start) a closed loop; a replay against the real stack does the same.
- `prefix_id` / `prefix_tokens` (optional): the first `prefix_tokens` of the prompt are shared with every request that
  has the same `prefix_id` (a RAG document, a system prompt), so one conversation's KV can serve another's prefix.
TTFT is measured from the issue time.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from pydantic import ConfigDict, TypeAdapter, ValidationError


@dataclass(frozen=True)
class TraceRequest:
    __pydantic_config__ = ConfigDict(extra="ignore")
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    conversation_id: str
    turn: int = 0
    think_s: float = 0.0
    prefix_id: str | None = None
    prefix_tokens: int = 0

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError("prompt_tokens and output_tokens must be >= 1")
        if self.arrival_s < 0 or self.think_s < 0 or self.turn < 0:
            raise ValueError("arrival_s, think_s and turn must be >= 0")
        if not 0 <= self.prefix_tokens <= self.prompt_tokens:
            raise ValueError("prefix_tokens must be within 0..prompt_tokens")


class TraceError(ValueError):
    """A trace file that does not parse; the message names the line and field."""


_ADAPTER = TypeAdapter(TraceRequest)


def read_trace(path: str | pathlib.Path) -> list[TraceRequest]:
    path = pathlib.Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise TraceError(f"{path}: no such trace file") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(_ADAPTER.validate_python(json.loads(line)))
        except json.JSONDecodeError as err:
            raise TraceError(f"{path}:{n}: not JSON: {err}") from None
        except ValidationError as err:
            msg = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}" for e in err.errors())
            raise TraceError(f"{path}:{n}: {msg}") from None
    return sort_trace(out)


def write_trace(requests: Iterable[TraceRequest], path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in requests:
            f.write(json.dumps({k: v for k, v in asdict(r).items() if v is not None}) + "\n")
    return path


def sort_trace(requests: Iterable[TraceRequest]) -> list[TraceRequest]:
    return sorted(requests, key=lambda r: (r.arrival_s, r.conversation_id, r.turn))


def conversations(requests: Sequence[TraceRequest]) -> dict[str, list[TraceRequest]]:
    """Turns grouped by conversation, in turn order (dict order: first arrival first)."""
    convs: dict[str, list[TraceRequest]] = {}
    for r in sort_trace(requests):
        convs.setdefault(r.conversation_id, []).append(r)
    for turns in convs.values():
        turns.sort(key=lambda r: r.turn)
    return convs


def scale_time(requests: Iterable[TraceRequest], factor: float) -> list[TraceRequest]:
    """The same trace with arrivals (not think times) stretched by `factor` (0.5 = twice the request rate)."""
    from dataclasses import replace

    return [replace(r, arrival_s=r.arrival_s * factor) for r in requests]


def arrival_window_s(requests: Sequence[TraceRequest]) -> float:
    """Seconds over which conversations start: the span of their first turns' arrivals plus one mean gap (for a
    generated workload, its duration). 0 for fewer than two conversations."""
    firsts: dict[str, float] = {}
    for r in requests:
        firsts[r.conversation_id] = min(firsts.get(r.conversation_id, r.arrival_s), r.arrival_s)
    starts = sorted(firsts.values())
    if len(starts) < 2:
        return 0.0
    return (starts[-1] - starts[0]) * len(starts) / (len(starts) - 1)


def offered_rate(requests: Sequence[TraceRequest]) -> float:
    """Requests per second over the arrival window (all turns counted)."""
    window = arrival_window_s(requests)
    return len(requests) / window if window > 0 else float(len(requests))
