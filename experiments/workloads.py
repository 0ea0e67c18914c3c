"""Multi-turn workloads for `ppd replay` and token-exact prompts for `ppd sweep`.

- `WordTokens`: texts of an exact token count (words that are single tokens of the model's tokenizer, so the
  router's tokenization of the text gives back exactly n tokens; no reliance on token-id prompts).
- `synthetic_chat`: chat conversations with lognormal turn lengths, a geometric number of turns and exponential
  think times (the shape ShareGPT/LMSYS traces show: a few turns, user messages of tens to hundreds of tokens,
  answers of a few hundred).
- `load_sharegpt`: ShareGPT-style JSONL/JSON (`{"conversations": [{"from": "human"|"gpt", "value": ...}, ...]}`);
  human turns are replayed as user messages, each gpt turn's length sets that turn's max_tokens.
- `rag`: single-turn requests over a shared pool of 2k-16k-token documents with a short query (<= 150 output).
- `head_of_line`: chat conversations plus one long document request arriving mid-run.
- `schedule`: Poisson conversation starts for a target request rate.
All generators are pure functions of their arguments and seed.
"""

from __future__ import annotations

import json
import math
import pathlib
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from ppd.tokenizer import ChatTokenizer

_WORD = re.compile(r"Ġ[a-z]{3,9}")


class WordTokens:
    """Space-prefixed lowercase words that are single tokens and encode back to themselves."""

    def __init__(self, tokenizer: ChatTokenizer):
        vocab = tokenizer._tok.get_vocab()
        ids = sorted(i for s, i in vocab.items() if _WORD.fullmatch(s))
        self.ids = tuple(i for i in ids if tokenizer.encode(tokenizer.decode([i])) == [i])
        if len(self.ids) < 64:
            raise ValueError("tokenizer has too few single-token words for exact-length texts")
        self._text = {i: tokenizer.decode([i]) for i in self.ids}

    def token_ids(self, n_tokens: int, rng: random.Random) -> list[int]:
        """`n_tokens` random word ids (the same draw as `text` with the same rng state)."""
        return [rng.choice(self.ids) for _ in range(n_tokens)]

    def text_of(self, ids: list[int]) -> str:
        return "".join(self._text[i] for i in ids)

    def text(self, n_tokens: int, rng: random.Random) -> str:
        """A text of exactly `n_tokens` tokens (each word keeps its leading space)."""
        return self.text_of(self.token_ids(n_tokens, rng))


@dataclass(frozen=True)
class Turn:
    user_text: str
    max_tokens: int
    think_s: float = 0.0  # user's pause after the previous answer, before sending this turn
    user_tokens: int = 0  # length of user_text in tokens, where known


@dataclass(frozen=True)
class Conversation:
    conv_id: str
    turns: tuple[Turn, ...]
    start_s: float = 0.0  # offset from the replay's start
    system: str = ""
    kind: str = "chat"  # chat | rag | document


def _lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))))


def synthetic_chat(
    words: WordTokens,
    n_conversations: int,
    seed: int = 0,
    mean_turns: float = 4.0,
    max_turns: int = 12,
    user_median_tokens: float = 120.0,
    user_sigma: float = 1.0,
    output_median_tokens: float = 150.0,
    output_sigma: float = 0.6,
    max_output_tokens: int = 512,
    think_mean_s: float = 3.0,
    system_tokens: int = 64,
) -> list[Conversation]:
    rng = random.Random(f"chat-{seed}")
    p_stop = 1.0 / max(1.0, mean_turns)
    convs = []
    for c in range(n_conversations):
        n_turns = 1
        while n_turns < max_turns and rng.random() > p_stop:
            n_turns += 1
        turns = []
        for k in range(n_turns):
            u = _lognormal_int(rng, user_median_tokens, user_sigma, 4, 4096)
            o = _lognormal_int(rng, output_median_tokens, output_sigma, 8, max_output_tokens)
            think = 0.0 if k == 0 else rng.expovariate(1.0 / think_mean_s)
            turns.append(Turn(words.text(u, rng), o, think, u))
        convs.append(Conversation(f"chat-{seed}-{c}", tuple(turns), system=words.text(system_tokens, rng)))
    return convs


def load_sharegpt(
    path: str | pathlib.Path,
    count_tokens,
    max_conversations: int | None = None,
    max_output_tokens: int = 512,
    think_mean_s: float = 3.0,
    seed: int = 0,
) -> list[Conversation]:
    """ShareGPT JSONL (one conversation per line) or a JSON list. `count_tokens(text) -> int` sizes the answers."""
    path = pathlib.Path(path)
    raw = path.read_text()
    stripped = raw.lstrip()
    if stripped.startswith("["):
        records = json.loads(raw)
    else:
        records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    rng = random.Random(f"sharegpt-{seed}")
    convs = []
    for n, rec in enumerate(records):
        msgs = rec.get("conversations") or rec.get("messages") or []
        turns = []
        pending: str | None = None
        for msg in msgs:
            who = msg.get("from") or msg.get("role")
            text = msg.get("value") if "value" in msg else msg.get("content", "")
            if who in ("human", "user"):
                pending = text
            elif who in ("gpt", "assistant", "chatgpt", "bard") and pending is not None:
                out = max(1, min(max_output_tokens, count_tokens(text)))
                think = 0.0 if not turns else rng.expovariate(1.0 / think_mean_s)
                turns.append(Turn(pending, out, think, count_tokens(pending)))
                pending = None
        if pending is not None:  # a trailing human message: answer it with a median-length reply
            turns.append(Turn(pending, min(max_output_tokens, 128), rng.expovariate(1.0 / think_mean_s)))
        if turns:
            convs.append(Conversation(str(rec.get("id", f"sharegpt-{n}")), tuple(turns)))
        if max_conversations is not None and len(convs) >= max_conversations:
            break
    return convs


def rag(
    words: WordTokens,
    n_requests: int,
    seed: int = 0,
    n_documents: int = 8,
    min_context_tokens: int = 2048,
    max_context_tokens: int = 16384,
    query_tokens: tuple[int, int] = (16, 64),
    max_output_tokens: int = 150,
) -> list[Conversation]:
    """Each request: one of a few shared documents (log-uniform 2k-16k tokens, popularity ~ 1/rank) + a short query."""
    rng = random.Random(f"rag-{seed}")
    docs = []
    for _ in range(n_documents):
        size = int(math.exp(rng.uniform(math.log(min_context_tokens), math.log(max_context_tokens))))
        docs.append((words.text(size, rng), size))
    weights = [1.0 / (k + 1) for k in range(n_documents)]
    convs = []
    for r in range(n_requests):
        doc, size = rng.choices(docs, weights)[0]
        q = rng.randint(*query_tokens)
        out = rng.randint(max(8, max_output_tokens // 3), max_output_tokens)
        convs.append(
            Conversation(
                f"rag-{seed}-{r}", (Turn(doc + "\n\nQuestion:" + words.text(q, rng), out, 0.0, size + q),), kind="rag"
            )
        )
    return convs


def head_of_line(
    words: WordTokens,
    n_conversations: int,
    doc_tokens: int,
    seed: int = 0,
    doc_output_tokens: int = 64,
    **chat_kwargs,
) -> list[Conversation]:
    """Chat conversations plus one `doc_tokens` document request (its start time is placed by `schedule`)."""
    convs = synthetic_chat(words, n_conversations, seed=seed, **chat_kwargs)
    rng = random.Random(f"doc-{seed}")
    doc = Conversation(
        f"doc-{seed}",
        (Turn(words.text(doc_tokens, rng) + "\n\nSummarize.", doc_output_tokens, 0.0, doc_tokens),),
        kind="document",
    )
    return convs + [doc]


def schedule(
    convs: Sequence[Conversation], request_rate: float, seed: int = 0, document_at: float = 0.3
) -> list[Conversation]:
    """Poisson conversation starts so that requests arrive at about `request_rate` per second overall.

    Conversations of kind "document" start at `document_at` x the span of the other starts (mid-run).
    """
    rng = random.Random(f"schedule-{seed}")
    others = [c for c in convs if c.kind != "document"]
    docs = [c for c in convs if c.kind == "document"]
    turns = sum(len(c.turns) for c in others) or 1
    conv_rate = request_rate * len(others) / turns if others else request_rate
    t = 0.0
    out = []
    for c in others:
        out.append(replace(c, start_s=t))
        t += rng.expovariate(conv_rate)
    span = out[-1].start_s if out else 0.0
    out += [replace(d, start_s=document_at * span) for d in docs]
    return sorted(out, key=lambda c: c.start_s)


def total_requests(convs: Iterable[Conversation]) -> int:
    return sum(len(c.turns) for c in convs)
