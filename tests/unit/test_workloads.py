"""Workload generators: exact token lengths, seeded determinism, distributions, ShareGPT loading, scheduling."""

import json
import random
import statistics

import pytest

from experiments import workloads as W
from ppd.tokenizer import ChatTokenizer


@pytest.fixture(scope="module")
def tok():
    return ChatTokenizer.load()


@pytest.fixture(scope="module")
def words(tok):
    return W.WordTokens(tok)


@pytest.mark.parametrize("n", [1, 7, 512, 4096])
def test_word_texts_have_exact_token_counts(tok, words, n):
    text = words.text(n, random.Random(n))
    assert len(tok.encode(text)) == n


def test_concatenated_texts_add_up(tok, words):
    rng = random.Random(1)
    a, b = words.text(300, rng), words.text(17, rng)
    assert len(tok.encode(a + b)) == 317
    assert tok.encode(a + b)[:300] == tok.encode(a)  # the history is a token prefix of history + append


def test_synthetic_chat_is_seeded_and_plausible(words):
    a = W.synthetic_chat(words, 40, seed=3)
    b = W.synthetic_chat(words, 40, seed=3)
    c = W.synthetic_chat(words, 40, seed=4)
    assert a == b and a != c
    turns = [t for conv in a for t in conv.turns]
    assert 2.0 < len(turns) / len(a) < 7.0  # mean_turns 4
    assert all(conv.turns[0].think_s == 0.0 for conv in a)
    thinks = [t.think_s for conv in a for t in conv.turns[1:]]
    assert 1.0 < statistics.mean(thinks) < 6.0  # exponential, mean 3 s
    user = [t.user_tokens for t in turns]
    assert min(user) >= 4 and statistics.median(user) > 30  # lognormal around 120
    assert all(8 <= t.max_tokens <= 512 for t in turns)


def test_rag_contexts_and_outputs(words):
    convs = W.rag(words, 30, seed=0, n_documents=4)
    sizes = [c.turns[0].user_tokens for c in convs]
    assert all(2048 <= s <= 16384 + 64 for s in sizes)
    assert all(c.turns[0].max_tokens <= 150 for c in convs)
    docs = {c.turns[0].user_text.split("\n\nQuestion:")[0] for c in convs}
    assert 1 < len(docs) <= 4  # shared documents: prefix reuse across requests


def test_head_of_line_adds_one_document(words):
    convs = W.head_of_line(words, 5, doc_tokens=3000, seed=1)
    docs = [c for c in convs if c.kind == "document"]
    assert len(docs) == 1 and docs[0].turns[0].user_tokens == 3000
    sched = W.schedule(convs, request_rate=4.0, seed=1)
    chat_starts = [c.start_s for c in sched if c.kind == "chat"]
    doc_start = next(c.start_s for c in sched if c.kind == "document")
    assert min(chat_starts) < doc_start < max(chat_starts)  # arrives mid-run, while others chat


def test_schedule_rate(words):
    convs = W.synthetic_chat(words, 400, seed=2)
    sched = W.schedule(convs, request_rate=10.0, seed=2)
    span = sched[-1].start_s
    rate = W.total_requests(sched) / span
    assert 8.0 < rate < 12.5
    assert [c.start_s for c in sched] == sorted(c.start_s for c in sched)


def test_sharegpt_loader(tmp_path, tok):
    recs = [
        {
            "id": "a",
            "conversations": [
                {"from": "human", "value": "Hello there, how are you?"},
                {"from": "gpt", "value": "I am fine, thanks for asking. " * 5},
                {"from": "human", "value": "Tell me a joke."},
                {"from": "gpt", "value": "No."},
            ],
        },
        {"id": "b", "conversations": [{"from": "gpt", "value": "orphan answer"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "last message without answer"}]},
    ]
    path = tmp_path / "sg.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    convs = W.load_sharegpt(path, lambda t: len(tok.encode(t)))
    assert [c.conv_id for c in convs] == ["a", "c"]
    a = convs[0]
    assert [t.user_text for t in a.turns] == ["Hello there, how are you?", "Tell me a joke."]
    assert a.turns[0].max_tokens == len(tok.encode("I am fine, thanks for asking. " * 5))
    assert a.turns[1].max_tokens == len(tok.encode("No."))
    # the JSON-list form gives the same
    path2 = tmp_path / "sg.json"
    path2.write_text(json.dumps(recs))
    assert W.load_sharegpt(path2, lambda t: len(tok.encode(t))) == convs
