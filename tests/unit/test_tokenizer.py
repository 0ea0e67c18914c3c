"""ChatTokenizer: chat template to ids, and multi-turn prefix stability thanks to remember_output."""

from __future__ import annotations

import json

from ppd.tokenizer import ChatTokenizer


def test_chat_template_layout():
    tok = ChatTokenizer.load()
    ids = tok.encode_chat([{"role": "user", "content": "Hello there"}])
    assert ids[0] == tok.bos_id
    assert tok.eot_id in ids
    assert "Hello there" in tok.decode(ids)
    no_gen = tok.encode_chat([{"role": "user", "content": "Hello there"}], add_generation_prompt=False)
    assert ids[: len(no_gen)] == no_gen and len(ids) > len(no_gen)  # the assistant header is appended


def test_content_parts_count_as_text():
    tok = ChatTokenizer.load()
    plain = tok.encode_chat([{"role": "user", "content": "ab cd"}])
    parts = tok.encode_chat(
        [{"role": "user", "content": [{"type": "text", "text": "ab "}, {"type": "text", "text": "cd"}]}]
    )
    assert plain == parts


def test_next_turn_extends_the_previous_prompt():
    tok = ChatTokenizer.load()
    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "First question?"}]
    p1 = tok.encode_chat(turn1)
    turn2 = turn1 + [{"role": "assistant", "content": "An answer."}, {"role": "user", "content": "Second?"}]
    assert tok.encode_chat(turn2)[: len(p1)] == p1


def test_remember_output_makes_history_token_exact():
    """Generated ids need not be what re-tokenizing their text gives; remembered, the next prompt holds them exactly."""
    tok = ChatTokenizer.load()
    turn1 = [{"role": "user", "content": "Say something."}]
    p1 = tok.encode_chat(turn1)
    text = "hello world"
    generated = [tok.encode(c)[0] for c in text]  # one id per character: valid, but not the canonical BPE
    assert tok.decode(generated) == text and tok.encode(text) != generated
    turn2 = turn1 + [{"role": "assistant", "content": text}, {"role": "user", "content": "More."}]
    assert tok.encode_chat(turn2)[: len(p1) + len(generated)] != p1 + generated  # without memory: mismatch
    tok.remember_output(text, generated + [tok.eot_id])  # special ids are dropped
    p2 = tok.encode_chat(turn2)
    assert p2[: len(p1) + len(generated) + 1] == p1 + generated + [tok.eot_id]
    turn3 = turn2 + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "Last."}]
    p3 = tok.encode_chat(turn3)
    assert p3[: len(p2)] == p2  # every turn extends the one before


def test_remember_is_bounded():
    tok = ChatTokenizer(ChatTokenizer.load()._tok, output_memory=2)
    for i in range(3):
        tok.remember_output(f"t{i}", [10 + i])
    assert tok._body_ids("assistant", "t0") == tok.encode("t0")  # the oldest was forgotten
    assert tok._body_ids("assistant", "t2") == [12]


def test_model_directory_with_own_template(tmp_path):
    builtin = ChatTokenizer.load()
    (tmp_path / "tokenizer.json").write_text(builtin._tok.to_str())
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tok = ChatTokenizer.load(str(tmp_path))
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert tok.decode(ids) == "[user]hi"


def test_batched_encoding_matches_piece_by_piece():
    """encode_chat encodes its pieces in one encode_batch call (it releases the GIL); the ids are what encoding each
    piece on its own gives, remembered assistant ids included."""
    tok = ChatTokenizer.load()
    raw = tok._tok
    text = "Long context, über alles; 12345 tokens?! " * 200
    assert tok.encode(text) == raw.encode(text, add_special_tokens=False).ids
    tok.remember_output("Sure.", [100, 101, 102])
    messages = [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": text},
        {"role": "assistant", "content": "Sure."},
        {"role": "assistant", "content": "Not remembered."},
        {"role": "user", "content": ""},
    ]
    expected = [tok.bos_id]
    for m in messages:
        expected += raw.encode(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", add_special_tokens=False).ids
        if m["content"] == "Sure.":
            expected += [100, 101, 102]
        else:
            expected += raw.encode(m["content"].strip(), add_special_tokens=False).ids
        expected += [tok.eot_id]
    expected += raw.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False).ids
    assert tok.encode_chat(messages) == expected
