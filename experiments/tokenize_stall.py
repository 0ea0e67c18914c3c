"""How long a long prompt's tokenization stalls the router's event loop, by how it is run.

    python -m experiments.tokenize_stall [--tokens 30000] [--repeats 5] [--json out.json]

While one long chat (about `--tokens` tokens, builtin tokenizer) is tokenized `--repeats` times back to back, a ticker
coroutine asks to wake every millisecond; its lateness is how long every other stream on the loop waits. Modes:
- inline-encode: `Tokenizer.encode` on the loop (the router before: holds the GIL and the loop);
- thread-encode: `Tokenizer.encode` in a worker thread (the loop is free but `encode` holds the GIL: it still stalls);
- inline-batch:  `ChatTokenizer.encode_chat` (encode_batch) on the loop;
- thread-batch:  `ChatTokenizer.encode_chat` in a worker thread (the router now: encode_batch releases the GIL).
Wall-clock numbers on a shared CPU: compare modes within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable

from ppd.tokenizer import ChatTokenizer

TICK_S = 0.001


def long_messages(tok: ChatTokenizer, tokens: int) -> list[dict]:
    words = " ".join(f"w{(i * 7919) % 1000} lorem" for i in range(tokens))
    text = words
    while len(tok.encode(text)) > tokens:  # trim to about `tokens`
        text = text[: int(len(text) * 0.9)]
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


async def _ticker(stop: asyncio.Event, late_ms: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(TICK_S)
        late_ms.append((loop.time() - t - TICK_S) * 1e3)


async def measure(work: Callable[[], object], threaded: bool, repeats: int) -> dict:
    stop, late_ms = asyncio.Event(), []
    ticker = asyncio.create_task(_ticker(stop, late_ms))
    await asyncio.sleep(0.05)  # ticking
    late_ms.clear()
    durations = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if threaded:
            await asyncio.to_thread(work)
        else:
            work()
            await asyncio.sleep(0)
        durations.append((time.perf_counter() - t0) * 1e3)
    stop.set()
    await ticker
    late_ms.sort()
    return {
        "tokenize_ms_median": statistics.median(durations),
        "stall_ms_p50": late_ms[len(late_ms) // 2] if late_ms else float("nan"),
        "stall_ms_p99": late_ms[int(len(late_ms) * 0.99)] if late_ms else float("nan"),
        "stall_ms_max": late_ms[-1] if late_ms else float("nan"),
        "ticks": len(late_ms),
    }


async def run(tokens: int, repeats: int) -> dict:
    tok = ChatTokenizer.load()
    messages = long_messages(tok, tokens)
    text = messages[1]["content"]
    n = len(tok.encode_chat(messages))
    modes = {
        "inline-encode": (lambda: tok._tok.encode(text, add_special_tokens=False), False),
        "thread-encode": (lambda: tok._tok.encode(text, add_special_tokens=False), True),
        "inline-batch": (lambda: tok.encode_chat(messages), False),
        "thread-batch": (lambda: tok.encode_chat(messages), True),
    }
    results = {name: await measure(work, threaded, repeats) for name, (work, threaded) in modes.items()}
    return {"prompt_tokens": n, "repeats": repeats, "modes": results}


def table(doc: dict) -> str:
    lines = [
        f"prompt: {doc['prompt_tokens']} tokens, {doc['repeats']} tokenizations per mode; loop ticker every 1 ms",
        "",
        "| mode | tokenize ms (median) | loop stall p50 ms | p99 ms | max ms | ticks |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in doc["modes"].items():
        lines.append(
            f"| {name} | {r['tokenize_ms_median']:.1f} | {r['stall_ms_p50']:.2f} | {r['stall_ms_p99']:.2f} "
            f"| {r['stall_ms_max']:.1f} | {r['ticks']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.tokenize_stall", description=__doc__)
    parser.add_argument("--tokens", type=int, default=30000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    doc = asyncio.run(run(args.tokens, args.repeats))
    print(table(doc))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
