"""Background decode load for `ppd sweep --background-streams N` (issue 11).

N long conversations (prompt `prompt_tokens`, `output_tokens` out, `ignore_eos`) are sent through the router with
the `prefill` policy, streaming, so they decode on the decode server while the measured append arrives. They run in
lockstep batches: before each measurement `ensure()` checks that every stream has enough tokens left to outlast it;
if not, the batch is closed (the router aborts the backend work) and a fresh one started and waited for.
Every stream's token arrival times are kept so the measurement can read the others' TPOT before and during the
append.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx

from experiments.client import stream_request
from experiments.workloads import WordTokens


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
    ):
        self.client, self.base_url, self.model, self.words = client, base_url, model, words
        self.n, self.prompt_tokens, self.output_tokens = n_streams, prompt_tokens, output_tokens
        self.seed, self.policy, self.extra_body = seed, policy, dict(extra_body or {})
        self.decode_urls = list(decode_urls or [])
        self.time_scale = time_scale
        self.prompt_format = prompt_format
        self.generation = 0
        self.times: list[list[float]] = []
        self.done: list[bool] = []
        self.errors: list[str] = []
        self._tasks: list[asyncio.Task] = []
        self.restarts = 0

    # --- lifecycle ---

    async def start(self) -> None:
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
        return ids if self.prompt_format == "ids" else self.words.text_of(ids)

    async def _run(self, i: int, prompt: list[int] | str) -> None:
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
