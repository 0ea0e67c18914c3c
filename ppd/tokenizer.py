"""Chat tokenization for the router: the model's chat template applied to OpenAI messages, to token ids.

The router must know each request's token ids to find the cached prefix on each server. Two sources:
- `builtin`: the small byte-level BPE shipped in ppd/assets/tokenizer.json (no hub; tests and the embedded stack);
- a model directory holding `tokenizer.json` (+ `tokenizer_config.json` with `chat_template`), e.g. real weights.

Multi-turn reuse needs token-exact history: re-tokenizing an assistant's text need not give back the ids the server
generated (BPE is not canonical over arbitrary id sequences), and a mismatch would break the decode server's cached
prefix. So the router remembers the ids it returned for each assistant text (`remember_output`) and reuses them
when that text comes back in a later turn's `messages`.

Every encode goes through the tokenizers library's `encode_batch`, which releases the GIL while it works (plain
`encode` holds it: 100+ ms for a 30k-token prompt), so a caller can tokenize long inputs in a worker thread
(asyncio.to_thread) while its event loop keeps serving; a chat is encoded as one batch of its pieces.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import jinja2
from tokenizers import Tokenizer

BUILTIN_PATH = pathlib.Path(__file__).resolve().parent / "assets" / "tokenizer.json"

# Llama-3 instruct layout. Header and body are tokenized separately so an assistant body can be spliced in as ids.
BOS = "<|begin_of_text|>"
EOT = "<|eot_id|>"
HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def message_text(content: Any) -> str:
    """OpenAI content: a string, or a list of parts of which the text parts count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")


class ChatTokenizer:
    def __init__(self, tokenizer: Tokenizer, chat_template: str | None = None, output_memory: int = 65536):
        self._tok = tokenizer
        self._template = jinja2.Environment().from_string(chat_template) if chat_template else None
        self._outputs: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._output_memory = output_memory
        vocab = tokenizer.get_vocab()
        self._vocab_size = tokenizer.get_vocab_size()  # read on every decode (a stream's hot path)
        self.special_ids = {
            vocab[t] for t in (BOS, EOT, "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>") if t in vocab
        }
        self.eos_ids = tuple(vocab[t] for t in (EOT, "<|end_of_text|>") if t in vocab)
        self.bos_id = vocab.get(BOS)
        self.eot_id = vocab.get(EOT)

    @classmethod
    def load(cls, source: str = "builtin") -> ChatTokenizer:
        if source == "builtin":
            return cls(Tokenizer.from_file(str(BUILTIN_PATH)))
        path = pathlib.Path(source)
        tok_file = path / "tokenizer.json" if path.is_dir() else path
        if not tok_file.exists():
            raise FileNotFoundError(f"no tokenizer.json at {tok_file}")
        template = None
        cfg = tok_file.parent / "tokenizer_config.json"
        if cfg.exists():
            template = json.loads(cfg.read_text()).get("chat_template")
        return cls(Tokenizer.from_file(str(tok_file)), template)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        return self._encode_many([text])[0]

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`. Ids past this tokenizer's vocabulary (a dummy-weight model samples all of its 128k) become
        `<|id_N|>`, so a reply always has text and `remember_output` maps that text back to the exact ids."""
        vocab = self._vocab_size
        if not ids or (min(ids) >= 0 and max(ids) < vocab):  # in C, not a generator per id
            return self._tok.decode(list(ids), skip_special_tokens=True)
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if 0 <= i < vocab:
                run.append(i)
                continue
            if run:
                parts.append(self._tok.decode(run, skip_special_tokens=True))
                run = []
            parts.append(f"<|id_{i}|>")
        if run:
            parts.append(self._tok.decode(run, skip_special_tokens=True))
        return "".join(parts)

    def _key(self, text: str) -> str:
        return hashlib.blake2b(text.strip().encode(), digest_size=16).hexdigest()

    def remember_output(self, text: str, ids: Sequence[int]) -> None:
        """Record the exact ids behind an assistant reply so the next turn reproduces the cached prefix."""
        ids = tuple(i for i in ids if i not in self.special_ids)
        key = self._key(text)
        self._outputs[key] = ids
        self._outputs.move_to_end(key)
        while len(self._outputs) > self._output_memory:
            self._outputs.popitem(last=False)

    def _remembered(self, role: str, text: str) -> list[int] | None:
        if role != "assistant":
            return None
        known = self._outputs.get(self._key(text))
        return list(known) if known is not None else None

    def _body_ids(self, role: str, text: str) -> list[int]:
        known = self._remembered(role, text)
        return known if known is not None else self.encode(text.strip())

    def encode_chat(self, messages: Iterable[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        msgs = [{"role": m["role"], "content": message_text(m.get("content"))} for m in messages]
        if self._template is not None:  # a model's own template: render to text, tokenize once
            text = self._template.render(messages=msgs, add_generation_prompt=add_generation_prompt, bos_token=BOS)
            return self.encode(text)
        # pieces in order: a list of ids (known already) or a text to encode; all texts go in one batch
        pieces: list[list[int] | str] = [[self.bos_id] if self.bos_id is not None else []]
        for m in msgs:
            pieces.append(HEADER.format(role=m["role"]))
            known = self._remembered(m["role"], m["content"])
            pieces.append(known if known is not None else m["content"].strip())
            pieces.append([self.eot_id] if self.eot_id is not None else [])
        if add_generation_prompt:
            pieces.append(HEADER.format(role="assistant"))
        encoded = iter(self._encode_many([p for p in pieces if isinstance(p, str)]))
        ids: list[int] = []
        for p in pieces:
            ids += next(encoded) if isinstance(p, str) else p
        return ids
