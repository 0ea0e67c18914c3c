"""/generate bodies: SGLang's fields, validated into frozen data; bad input raises RequestError (HTTP 400)."""

from __future__ import annotations

import pytest

from ppd.emulator.schemas import RequestError, parse_generate
from ppd.sglang.protocol import LOCAL_APPEND_HOST


def parse(data, **kw):
    return parse_generate(data, vocab_size=1000, context_length=1000, **kw)


def test_defaults_and_bootstrap_fields():
    req = parse({"input_ids": [1, 2, 3]})
    assert req.sampling.max_new_tokens == 128 and req.sampling.temperature == 1.0  # SGLang defaults
    assert req.input_ids == (1, 2, 3) and not req.stream and not req.has_bootstrap and req.rid
    local = parse(
        {
            "input_ids": [1],
            "bootstrap_host": LOCAL_APPEND_HOST,
            "bootstrap_port": 0,
            "bootstrap_room": 5,
            "sampling_params": {"max_new_tokens": 4, "stop_token_ids": [7], "sampling_seed": 3},
        }
    )
    assert local.is_local_append and local.has_bootstrap and local.bootstrap_room == 5
    assert local.sampling.stop_token_ids == frozenset({7}) and local.sampling.seed == 3
    assert parse({"input_ids": [1], "rid": "abc", "return_logprob": False}).rid == "abc"  # unknown fields ignored


def test_text_input_needs_a_tokenizer():
    assert parse({"text": "hi", "sampling_params": {"max_new_tokens": 2}}, encode=lambda t: [4, 5]).input_ids == (4, 5)
    with pytest.raises(RequestError, match="tokenizer"):
        parse({"text": "hi"})


@pytest.mark.parametrize(
    "data, message",
    [
        ({}, "Either text or input_ids"),
        ({"input_ids": [1], "text": "x"}, "not both"),
        ({"input_ids": []}, "must not be empty"),
        ({"input_ids": [1, 1000]}, "vocab size"),
        ({"input_ids": [1] * 1000}, "longer than the model.s context length"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 1000}}, "exceeds the model.s context length"),
        ({"input_ids": [1], "sampling_params": {"top_p": 0}}, "top_p"),
        ({"input_ids": [1], "sampling_params": {"top_k": 0}}, "top_k"),
        ({"input_ids": [1], "sampling_params": {"n": 2}}, "n=1"),
        ({"input_ids": [[1], [2]]}, "batch"),
        ({"input_ids": [1], "bootstrap_room": -1}, "bootstrap_room"),
        ("text", "JSON object"),
    ],
)
def test_bad_input(data, message):
    with pytest.raises(RequestError, match=message):
        parse(data)
