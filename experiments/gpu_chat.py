"""A two-turn chat through the AppendRouter with the official `openai` client, non-stream and stream.

    python -m experiments.gpu_chat --base-url http://127.0.0.1:8000/v1 --out results/h200x2/chat.json \
        [--second-turn-policy decode]

Turn 1 and turn 2 (with turn 1's answer in `messages`) each non-stream and stream; records the text, usage, the
router's route headers (x-ppd-*) and, for the stream, the time to the first content chunk. `--second-turn-policy`
sends `x-ppd-policy` on turn 2 (decode: the D-route, when the decode server runs ppd.sglang.ext).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from experiments import gpu_common as G


def one(client, model: str, messages: list[dict], stream: bool, policy: str | None, max_tokens: int) -> dict[str, Any]:
    headers = {"x-ppd-policy": policy} if policy else {}
    t0 = time.perf_counter()
    if not stream:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0, extra_headers=headers
        )
        resp = raw.parse()
        return {
            "stream": False,
            "text": resp.choices[0].message.content,
            "finish_reason": resp.choices[0].finish_reason,
            "usage": resp.usage.model_dump() if resp.usage else None,
            "headers": {k: v for k, v in raw.headers.items() if k.startswith("x-ppd") or k == "x-request-id"},
            "e2e_ms": round((time.perf_counter() - t0) * 1000, 2),
        }
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=headers,
    )
    stream_obj = raw.parse()
    text, ttft, usage, chunks = "", None, None, 0
    for chunk in stream_obj:
        chunks += 1
        if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content is not None:
            ttft = ttft or (time.perf_counter() - t0)
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage.model_dump()
    return {
        "stream": True,
        "text": text,
        "chunks": chunks,
        "usage": usage,
        "headers": {k: v for k, v in raw.headers.items() if k.startswith("x-ppd") or k == "x-request-id"},
        "ttft_ms": None if ttft is None else round(ttft * 1000, 2),
        "e2e_ms": round((time.perf_counter() - t0) * 1000, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--second-turn-policy", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import openai

    client = openai.OpenAI(base_url=args.base_url, api_key="ppd", timeout=600)
    model = client.models.list().data[0].id
    doc: dict[str, Any] = {"experiment": "gpu_chat", "openai": openai.__version__, "model": model, "turns": []}
    ok = True
    for stream in (False, True):
        messages = [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": f"Name three prime numbers. ({'stream' if stream else 'no stream'})"},
        ]
        try:
            t1 = one(client, model, messages, stream, None, args.max_tokens)
            messages = messages + [
                {"role": "assistant", "content": t1["text"]},
                {"role": "user", "content": "And three more, please."},
            ]
            t2 = one(client, model, messages, stream, args.second_turn_policy, args.max_tokens)
            doc["turns"] += [dict(t1, turn=1), dict(t2, turn=2)]
            for t in (t1, t2):
                print(
                    f"stream={stream} route={t['headers'].get('x-ppd-route')} usage={t['usage']} "
                    f"ttft={t.get('ttft_ms')} e2e={t['e2e_ms']} text={t['text'][:60]!r}",
                    flush=True,
                )
        except Exception as err:  # the record of what failed is the result here
            ok = False
            doc["turns"].append({"stream": stream, "error": repr(err)})
            print(f"stream={stream} FAILED: {err!r}", flush=True)
    G.write_json(args.out, doc)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
