"""Client CPU per streamed /generate call: httpx (the router's first client), aiohttp (its second) and the router's
own HTTP/1.1 transport (ppd.sglang.transport, httptools; what it uses now).

    python -m experiments.http_client_cost --out results/router-overhead/http_client_cost.json

An in-process asyncio server answers every POST with a 2-chunk SSE stream plus `data: [DONE]` (chunked encoding, as
SGLang does); the body is a 2048-id /generate request (~14 KB). Requests run one after another on one event loop,
so the process CPU time per request is the client's cost plus the (tiny, identical) server's. Rounds alternate
between the clients; the medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import random
import statistics
import sys
import time

import aiohttp
import httpx
import orjson

from ppd.sglang.transport import Http11Transport

CHUNKS = [
    b"data: "
    + orjson.dumps({"text": "x", "output_ids": [5], "meta_info": {"finish_reason": None, "completion_tokens": 1}})
    + b"\n\n",
    b"data: "
    + orjson.dumps({"output_ids": [], "meta_info": {"finish_reason": {"type": "length"}, "completion_tokens": 1}})
    + b"\n\n",
    b"data: [DONE]\n\n",
]
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in CHUNKS)
    + b"0\r\n\r\n"
)


class _SSE(asyncio.Protocol):
    def connection_made(self, transport):  # type: ignore[override]
        self.transport, self.buf = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self.buf[:end].split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            self.transport.write(RESPONSE)


async def measure(n: int, rounds: int, prompt_tokens: int) -> dict:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_SSE, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/generate"
    rng = random.Random(0)
    body = orjson.dumps({"input_ids": [rng.randint(0, 128000) for _ in range(prompt_tokens)], "stream": True})
    headers = {"content-type": "application/json"}
    out: dict[str, list[float]] = {"httpx": [], "aiohttp": [], "ppd": []}
    base = url.rsplit("/", 1)[0]
    ours = Http11Transport(connect_timeout_s=5.0)
    async with httpx.AsyncClient() as hx, aiohttp.ClientSession() as ah:

        async def via_httpx() -> None:
            r = await hx.send(hx.build_request("POST", url, content=body, headers=headers), stream=True)
            async for _ in r.aiter_raw():
                pass
            await r.aclose()

        async def via_aiohttp() -> None:
            async with ah.post(url, data=body, headers=headers) as r:
                async for _ in r.content.iter_any():
                    pass

        async def via_ppd() -> None:
            async with ours.stream(base, "/generate", body) as r:
                async for _ in r.reads():
                    pass

        for _ in range(rounds):
            for name, call in (("httpx", via_httpx), ("aiohttp", via_aiohttp), ("ppd", via_ppd)):
                for _ in range(max(10, n // 20)):  # warm the pool
                    await call()
                t0 = time.process_time()
                for _ in range(n):
                    await call()
                out[name].append((time.process_time() - t0) / n * 1e6)
    await ours.aclose()
    server.close()
    return {name: {"cpu_us_per_call_median": statistics.median(v), "rounds_us": v} for name, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=1000, help="calls per client per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop", help="the router runs on uvloop")
    p.add_argument("--out", default="results/router-overhead/http_client_cost.json")
    args = p.parse_args(argv)
    if args.loop == "uvloop":
        import uvloop

        doc = uvloop.run(measure(args.calls, args.rounds, args.prompt_tokens))
    else:
        doc = asyncio.run(measure(args.calls, args.rounds, args.prompt_tokens))
    doc.update(
        {
            "experiment": "http_client_cost",
            "command": "python -m experiments.http_client_cost " + " ".join(sys.argv[1:] if argv is None else argv),
            "loop": args.loop,
            "calls": args.calls,
            "prompt_tokens": args.prompt_tokens,
        }
    )
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    for name in ("httpx", "aiohttp", "ppd"):
        print(f"{name:8s} {doc[name]['cpu_us_per_call_median']:7.0f} us CPU per streamed call (median of rounds)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
