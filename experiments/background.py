"""Background decode load for `ppd sweep --background-streams N` (issue 11).

N long conversations (prompt `prompt_tokens`, `output_tokens` out, `ignore_eos`) are sent through the router with
the `prefill` policy, streaming, so they decode on the decode server while the measured append arrives. With
`direct=True` they bypass the router: each is one PD request sent straight to the first prefill and decode server
behind it (mini_lb's protocol: the same /generate body with bootstrap fields to both), so their token times show the
decode GPU's interference only, not the router's relay of N streams (a Python router relaying ~4,500 tokens/s on
2xH200 fell behind and delivered tokens in bursts, which the "before vs during" comparison would count as stall). They run in
lockstep batches: before each measurement `ensure()` checks that every stream has enough tokens left to outlast it;
if not, the batch is closed (the router aborts the backend work) and a fresh one started and waited for.
Every stream's token arrival times are kept so the measurement can read the others' TPOT before and during the
append.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import httpx

from experiments.client import stream_request
from experiments.workloads import WordTokens
from ppd.sglang import protocol
from ppd.sglang.client import DeltaIds


@dataclass(frozen=True)
class DirectPD:
    """Where background streams go when they bypass the router: one prefill (with its bootstrap port), one decode."""

    prefill_url: str
    bootstrap_port: int
    decode_url: str


async def discover_pd(client: httpx.AsyncClient, router_url: str) -> DirectPD:
    """The router's first prefill and decode server (its /ppd/backends), roles and bootstrap port from each server's
    /server_info (SGLang's and the emulator's alike)."""
    r = await client.get(f"{router_url}/ppd/backends", timeout=10.0)
    r.raise_for_status()
    prefill = decode = None
    port = 0
    for b in r.json().get("backends", []):
        info = (await client.get(f"{b['url']}/server_info", timeout=10.0)).json()
        mode = info.get("disaggregation_mode")
        if mode == "prefill" and prefill is None:
            prefill, port = b["url"], int(info.get("disaggregation_bootstrap_port") or 0)
        elif mode == "decode" and decode is None:
            decode = b["url"]
    if prefill is None or decode is None or not port:
        raise RuntimeError("background streams --bg-direct need a prefill (with bootstrap port) and a decode server")
    return DirectPD(prefill, port, decode)


class BackgroundPool:
    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        model: str,
        words: WordTokens,
        n_streams: int,
        prompt_tokens: int = 2048,
        output_tokens: int = 1024,
        seed: int = 0,
        policy: str = "prefill",
        extra_body: dict | None = None,
        decode_urls: list[str] | None = None,
        time_scale: float = 1.0,
        prompt_format: str = "ids",
        direct: bool = False,
    ):
        self.client, self.base_url, self.model, self.words = client, base_url, model, words
        self.n, self.prompt_tokens, self.output_tokens = n_streams, prompt_tokens, output_tokens
        self.seed, self.policy, self.extra_body = seed, policy, dict(extra_body or {})
        self.decode_urls = list(decode_urls or [])
        self.time_scale = time_scale
        self.prompt_format = prompt_format
        self.direct = direct
        self.pd: DirectPD | None = None
        self.generation = 0
        self.times: list[list[float]] = []
        self.done: list[bool] = []
        self.errors: list[str] = []
        self._tasks: list[asyncio.Task] = []
        self.restarts = 0

    # --- lifecycle ---

    async def start(self) -> None:
        if self.direct and self.pd is None:
            self.pd = await discover_pd(self.client, self.base_url)
            if not self.decode_urls:
                self.decode_urls = [self.pd.decode_url]
        self.generation += 1
        rng = random.Random(f"bg-{self.seed}-{self.n}-{self.generation}")
        self.times = [[] for _ in range(self.n)]
        self.done = [False] * self.n
        self._tasks = [asyncio.create_task(self._run(i, self._prompt(rng))) for i in range(self.n)]
        await self.wait_new_tokens(2, timeout_s=600.0)
        if self.any_done():
            await self.stop()
            raise RuntimeError(f"background streams ended at start: {self.errors[-1] if self.errors else 'no error'}")

    def _prompt(self, rng: random.Random) -> list[int] | str:
        ids = self.words.token_ids(self.prompt_tokens, rng)
        return ids if self.prompt_format == "ids" or self.direct else self.words.text_of(ids)

    async def _run(self, i: int, prompt: list[int] | str) -> None:
        if self.pd is not None:
            return await self._run_direct(i, list(prompt), self.pd)
        times = self.times[i]
        body = {"model": self.model, "prompt": prompt, "max_tokens": self.output_tokens, "temperature": 0.0}
        body.update(self.extra_body)
        headers = {"x-ppd-policy": self.policy, "x-ppd-conversation": f"bg-{self.seed}-{self.generation}-{i}"}
        try:
            res = await stream_request(self.client, self.base_url, body, headers, on_token=times.append)
            if res.error:
                self.errors.append(res.error)
        finally:
            self.done[i] = True

    async def _run_direct(self, i: int, ids: list[int], pd: DirectPD) -> None:
        """One PD request straight to the servers; the decode half streams the tokens."""
        times = self.times[i]
        sampling = {"max_new_tokens": self.output_tokens, "temperature": 0.0, "ignore_eos": True}
        body = protocol.with_bootstrap(
            protocol.generate_body(ids, sampling, stream=True, rid=f"bg-{self.seed}-{self.generation}-{i}"),
            protocol.bootstrap_hostname(pd.prefill_url),
            pd.bootstrap_port,
            protocol.new_bootstrap_room(),
        )
        prefill = asyncio.create_task(self.client.post(f"{pd.prefill_url}/generate", json=body))
        try:
            delta = DeltaIds()
            async with self.client.stream("POST", f"{pd.decode_url}/generate", json=body) as resp:
                if resp.status_code != 200:
                    self.errors.append(f"decode HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
                    return
                async for line in resp.aiter_lines():
                    out = protocol.parse_sse_line(line)
                    if out is None:
                        continue
                    now = time.perf_counter()
                    times.extend([now] * len(delta.feed(out)))
                    reason = out.finish_reason
                    if reason and reason.get("type") == "abort":
                        self.errors.append(f"aborted: {reason.get('message')}")
        except httpx.HTTPError as err:
            self.errors.append(repr(err))
        finally:
            self.done[i] = True
            if not prefill.done():
                prefill.cancel()
            await asyncio.gather(prefill, return_exceptions=True)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._wait_decode_idle()

    async def restart(self) -> None:
        await self.stop()
        self.restarts += 1
        await self.start()

    async def _wait_decode_idle(self, timeout_s: float = 60.0) -> None:
        """After closing streams: wait until the decode server(s) report no running requests (when we know them),
        so a new batch does not start on top of the old one's leftovers."""
        if not self.decode_urls:
            await asyncio.sleep(0.05)
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            running = 0.0
            for url in self.decode_urls:
                try:
                    text = (await self.client.get(url + "/metrics")).text
                except httpx.HTTPError:
                    return
                for line in text.splitlines():
                    if line.startswith("sglang:num_running_reqs"):
                        running += float(line.rsplit(" ", 1)[-1])
            if running <= 0:
                return
            await asyncio.sleep(0.05)

    # --- state ---

    def tokens(self) -> list[int]:
        return [len(t) for t in self.times]

    def min_remaining(self) -> int:
        return min((self.output_tokens - len(t) for t in self.times), default=0)

    def any_done(self) -> bool:
        return any(self.done)

    async def ensure(self, min_remaining: int) -> None:
        """Restart the batch if a stream ended or has fewer than `min_remaining` tokens left."""
        if not self._tasks:
            await self.start()
        elif self.any_done() or self.min_remaining() < min_remaining:
            await self.restart()

    async def wait_new_tokens(self, k: int, timeout_s: float = 120.0) -> None:
        """Until every live stream has k more tokens than now (steady decode after some disturbance)."""
        target = [len(t) + k for t in self.times]
        deadline = time.monotonic() + timeout_s
        while True:
            if all(d or len(t) >= n for t, n, d in zip(self.times, target, self.done, strict=True)):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"background streams did not advance {k} tokens in {timeout_s:.0f} s")
            await asyncio.sleep(0.002)
