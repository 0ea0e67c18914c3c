"""Seedable workload generators for the simulator: parametric conversations -> a trace (ppd.simulate.trace).

A `WorkloadSpec` is plain data: how many turns a conversation has (geometric, as in experiments/workloads.py), how
long the system prompt, shared documents, user messages and answers are, and how long users think. `generate()`
turns it into `TraceRequest`s with Poisson (or evenly spaced) conversation starts at a target *request* rate.

Common random numbers: conversation i's content depends only on (seed, i), and start times are standard
exponentials scaled by the rate, so the same seed at two rates gives the same conversations, only denser. That makes
"highest rate that meets the SLO" searches smooth.

Presets (`WORKLOADS`): `chat` mirrors experiments.workloads.synthetic_chat (4 turns on average, user messages ~120
tokens, answers ~150, 3 s think time); `rag` is prefill-heavy (2k-16k tokens of retrieved context per question,
<= 150-token answers, an occasional follow-up); `long-output` is decode-heavy (short prompts, ~1000-token answers);
`fixed` is constant lengths at evenly spaced arrivals (hand-checkable cases).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import yaml

from ppd.simulate.trace import TraceRequest


@dataclass(frozen=True)
class LengthDist:
    """A token count. lognormal: a = median, b = sigma; loguniform / uniform: a..b; const: a. Clipped to lo..hi."""

    kind: Literal["const", "lognormal", "loguniform", "uniform"] = "const"
    a: float = 128
    b: float = 0.0
    lo: int = 1
    hi: int = 1 << 20

    def sample(self, rng: np.random.Generator) -> int:
        if self.kind == "const":
            x = self.a
        elif self.kind == "lognormal":
            x = rng.lognormal(math.log(self.a), self.b) if self.b > 0 else self.a
        elif self.kind == "loguniform":
            x = math.exp(rng.uniform(math.log(self.a), math.log(self.b)))
        elif self.kind == "uniform":
            x = rng.uniform(self.a, self.b)
        else:
            raise ValueError(f"unknown length distribution {self.kind!r}")
        return int(min(self.hi, max(self.lo, round(x))))

    def mean(self) -> float:
        """Mean before clipping (for descriptions)."""
        if self.kind == "lognormal":
            return self.a * math.exp(self.b**2 / 2)
        if self.kind == "loguniform":
            return (self.b - self.a) / math.log(self.b / self.a) if self.b > self.a else self.a
        if self.kind == "uniform":
            return (self.a + self.b) / 2
        return self.a


def const(n: int) -> LengthDist:
    return LengthDist("const", n)


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    rate: float = 2.0  # requests per second (all turns), the default when none is given
    duration_s: float = 300.0  # conversations start within [0, duration_s)
    arrival: Literal["poisson", "uniform"] = "poisson"
    mean_turns: float = 1.0  # geometric number of turns, 1..max_turns
    max_turns: int = 1
    system_tokens: int = 0  # each conversation's own system prompt
    first_user: LengthDist = field(default_factory=lambda: const(128))  # turn 0's message (RAG: the question)
    user: LengthDist = field(default_factory=lambda: const(128))  # later turns' messages
    output: LengthDist = field(default_factory=lambda: const(128))
    context: LengthDist | None = None  # retrieved context in front of turn 0's question (RAG), None = none
    n_documents: int = 0  # >0: the context is one of this many shared documents (popularity ~ 1/rank)
    think_mean_s: float = 0.0  # exponential pause after an answer before the next turn
    slo_ttft_ms: float = 1000.0  # the SLO this workload is usually judged by (callers may override)
    slo_tpot_ms: float = 50.0
    # schedule hint for later turns: a response takes about this long (the replay rule keeps the truth)
    response_hint_s: float = 0.2
    response_hint_per_token_s: float = 0.015

    def response_hint(self, output_tokens: int) -> float:
        return self.response_hint_s + self.response_hint_per_token_s * output_tokens

    def warm_start_s(self) -> float:
        """How long before time 0 conversations start so that the load is stationary from 0: the span of a
        conversation with as many turns as 99 % of conversations have at most."""
        if self.max_turns <= 1:
            return 0.0
        keep = 1.0 - 1.0 / max(1.0, self.mean_turns)
        turns = self.max_turns if keep <= 0 else min(self.max_turns, math.ceil(math.log(0.01) / math.log(keep)))
        return (turns - 1) * (self.think_mean_s + self.response_hint(int(self.output.mean())))

    def expected_turns(self) -> float:
        """E[turns] of the geometric-with-cap draw in `generate` (same rule as experiments.workloads)."""
        if self.max_turns <= 1:
            return 1.0
        keep = 1.0 - 1.0 / max(1.0, self.mean_turns)
        return sum(keep**k for k in range(self.max_turns))

    def describe(self) -> str:
        ctx = f", context ~{self.context.mean():.0f}" if self.context else ""
        return (
            f"{self.name}: {self.expected_turns():.1f} turns/conv, first message ~{self.first_user.mean():.0f}{ctx}, "
            f"later messages ~{self.user.mean():.0f}, answers ~{self.output.mean():.0f} tokens, "
            f"think {self.think_mean_s:g}s"
        )


WORKLOADS: dict[str, WorkloadSpec] = {
    "chat": WorkloadSpec(
        "chat",
        rate=8.0,
        mean_turns=4.0,
        max_turns=12,
        system_tokens=64,
        first_user=LengthDist("lognormal", 120, 1.0, 4, 4096),
        user=LengthDist("lognormal", 120, 1.0, 4, 4096),
        output=LengthDist("lognormal", 150, 0.6, 8, 512),
        think_mean_s=3.0,
        slo_ttft_ms=500.0,
        slo_tpot_ms=30.0,
    ),
    "rag": WorkloadSpec(
        "rag",
        rate=4.0,
        mean_turns=1.5,
        max_turns=4,
        system_tokens=64,
        context=LengthDist("loguniform", 2048, 16384),
        first_user=LengthDist("uniform", 16, 64),
        user=LengthDist("uniform", 16, 64),
        output=LengthDist("uniform", 50, 150),
        think_mean_s=3.0,
        slo_ttft_ms=1500.0,
        slo_tpot_ms=30.0,
    ),
    "long-output": WorkloadSpec(
        "long-output",
        rate=4.0,
        system_tokens=64,
        first_user=LengthDist("lognormal", 200, 0.5, 16, 4096),
        output=LengthDist("lognormal", 1000, 0.4, 64, 4096),
        slo_ttft_ms=500.0,
        slo_tpot_ms=30.0,
    ),
    "fixed": WorkloadSpec("fixed", rate=1.0, arrival="uniform"),
}


def workload(name: str) -> WorkloadSpec:
    if name not in WORKLOADS:
        raise KeyError(f"unknown workload {name!r}; known: {', '.join(sorted(WORKLOADS))} (or a .jsonl trace)")
    return WORKLOADS[name]


def with_overrides(spec: WorkloadSpec, items: list[str]) -> WorkloadSpec:
    """`key=value` / `dist.field=value` overrides (YAML-typed), e.g. `output.a=1000`, `mean_turns=2`."""
    for item in items:
        if "=" not in item:
            raise ValueError(f"workload override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        names = {f.name for f in dataclasses.fields(WorkloadSpec)}
        if "." in key:
            outer, inner = key.split(".", 1)
            base = getattr(spec, outer, None) if outer in names else None
            if not isinstance(base, LengthDist) and not (outer == "context" and base is None):
                raise ValueError(f"workload override {item!r}: {outer!r} is not a length distribution")
            spec = replace(spec, **{outer: replace(base or LengthDist(), **{inner: value})})
        elif key in names:
            spec = replace(spec, **{key: value})
        else:
            raise ValueError(f"workload override {item!r}: unknown field; known: {', '.join(sorted(names))}")
    return spec


def generate(
    spec: WorkloadSpec,
    rate: float | None = None,
    duration_s: float | None = None,
    seed: int = 0,
    warm_start: bool = True,
) -> list[TraceRequest]:
    """The trace of `spec` at `rate` requests/s (default spec.rate): every request that arrives in [0, duration).

    Turn k of a conversation is scheduled at the previous turn's schedule + a response-time hint + its think time
    (`arrival_s`), and keeps its `think_s`, so a replay issues it at max(arrival_s, previous answer + think_s): open
    loop while the system keeps up, closed loop when it does not. With `warm_start` conversations also start before
    time 0 (as far back as a long conversation lasts) and only their turns from time 0 on are kept, so the request
    rate is stationary from the start instead of ramping up while multi-turn conversations accumulate. The first
    kept turn of such a conversation carries its whole history in its prompt (cold cache, as after an eviction).
    """
    rate = spec.rate if rate is None else rate
    duration_s = spec.duration_s if duration_s is None else duration_s
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration must be > 0")
    conv_rate = rate / spec.expected_turns()
    docs = _documents(spec, seed)
    starts = np.random.default_rng([seed, 1 << 20])
    out: list[TraceRequest] = []
    t = -spec.warm_start_s() if warm_start else 0.0
    i = 0
    while t < duration_s:
        out.extend(_conversation(spec, seed, i, t, docs, duration_s))
        i += 1
        gap = starts.exponential(1.0) if spec.arrival == "poisson" else 1.0
        t += gap / conv_rate
    return out


def _documents(spec: WorkloadSpec, seed: int) -> list[int]:
    if spec.context is None or spec.n_documents <= 0:
        return []
    rng = np.random.default_rng([seed, 1 << 21])
    return [spec.context.sample(rng) for _ in range(spec.n_documents)]


def _conversation(
    spec: WorkloadSpec, seed: int, i: int, start_s: float, docs: list[int], end_s: float
) -> list[TraceRequest]:
    """Conversation i's turns that arrive in [0, end_s) (its lengths depend on (seed, i) only)."""
    rng = np.random.default_rng([seed, i])
    n_turns = 1
    p_stop = 1.0 / max(1.0, spec.mean_turns)
    while n_turns < spec.max_turns and rng.random() > p_stop:
        n_turns += 1
    conv_id = f"{spec.name}-{seed}-{i}"
    prefix_id, prefix_tokens, context = None, 0, 0
    if spec.context is not None:
        if docs:
            weights = np.array([1.0 / (k + 1) for k in range(len(docs))])
            d = int(rng.choice(len(docs), p=weights / weights.sum()))
            context = docs[d]
            # the system prompt is the same for every request of the workload, so it is part of the shared prefix
            prefix_id, prefix_tokens = f"{spec.name}-{seed}-doc{d}", spec.system_tokens + context
        else:
            context = spec.context.sample(rng)
    history = spec.system_tokens + context
    out = []
    at, last_answer = start_s, 0
    for k in range(n_turns):
        message = (spec.first_user if k == 0 else spec.user).sample(rng)
        answer = spec.output.sample(rng)
        think = float(rng.exponential(spec.think_mean_s)) if k > 0 and spec.think_mean_s > 0 else 0.0
        if k > 0:
            at += spec.response_hint(last_answer) + think
        prompt = history + message
        history, last_answer = prompt + answer, answer
        if at < 0.0:
            continue  # before the trace starts: part of the kept turns' history
        if at >= end_s:
            break
        out.append(
            TraceRequest(
                arrival_s=at,
                prompt_tokens=prompt,
                output_tokens=answer,
                conversation_id=conv_id,
                turn=k,
                think_s=think,
                prefix_id=prefix_id,
                prefix_tokens=prefix_tokens,
            )
        )
    return out
