"""/generate and /abort_request bodies as SGLang 0.5.10.post1 accepts them (the fields the emulator uses; others are
accepted and ignored, like SGLang ignores what a model does not need), validated into frozen data."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ppd.sglang.protocol import LOCAL_APPEND_HOST


class RequestError(ValueError):
    """Bad input: answered with HTTP 400 and SGLang's error JSON."""


class SamplingParamsBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    max_new_tokens: int | None = Field(default=128, ge=0)
    min_new_tokens: int = Field(default=0, ge=0)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = -1
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    sampling_seed: int | None = None
    n: int = 1

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v < -1 or v == 0:
            raise ValueError("top_k must be -1 (disable) or at least 1")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if v != 1:
            raise ValueError("the emulator supports n=1 only")
        return v


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    input_ids: list[int] | list[list[int]] | None = None
    text: str | list[str] | None = None
    sampling_params: SamplingParamsBody | None = None
    stream: bool = False
    rid: str | None = None
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    stop_token_ids: frozenset[int]
    ignore_eos: bool
    seed: int | None


@dataclass(frozen=True)
class GenerateRequest:
    rid: str
    input_ids: tuple[int, ...]
    sampling: Sampling
    stream: bool
    bootstrap_host: str | None
    bootstrap_port: int | None
    bootstrap_room: int | None

    @property
    def is_local_append(self) -> bool:
        return self.bootstrap_host == LOCAL_APPEND_HOST

    @property
    def has_bootstrap(self) -> bool:
        return self.bootstrap_room is not None


def _format(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors())


def parse_generate(
    data: Any, *, vocab_size: int, context_length: int, encode=None, default_max_new_tokens: int = 128
) -> GenerateRequest:
    """Validate a /generate body. `encode(text) -> ids` handles `text` input (None: text is refused)."""
    if not isinstance(data, dict):
        raise RequestError("request body must be a JSON object")
    try:
        body = GenerateBody.model_validate(data)
    except ValidationError as err:
        raise RequestError(_format(err)) from None
    if body.input_ids is not None and body.text is not None:
        raise RequestError("Either text or input_ids should be provided, not both.")
    if body.input_ids is None and body.text is None:
        raise RequestError("Either text or input_ids should be provided.")
    if body.text is not None:
        if not isinstance(body.text, str):
            raise RequestError("batch requests (a list of texts) are not supported by the emulator")
        if encode is None:
            raise RequestError("text input needs a tokenizer; send input_ids")
        ids = list(encode(body.text))
    else:
        if body.input_ids and isinstance(body.input_ids[0], list):
            raise RequestError("batch requests (a list of input_ids lists) are not supported by the emulator")
        ids = list(body.input_ids or [])
    if not ids:
        raise RequestError("The input_ids must not be empty.")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise RequestError(f"The input_ids contains values outside the vocab size ({vocab_size}).")
    sp = body.sampling_params or SamplingParamsBody()
    max_new = default_max_new_tokens if sp.max_new_tokens is None else sp.max_new_tokens
    if len(ids) >= context_length:
        raise RequestError(
            f"The input ({len(ids)} tokens) is longer than the model's context length ({context_length} tokens)."
        )
    if len(ids) + max_new > context_length:
        raise RequestError(
            f"Requested token count ({len(ids)} input + {max_new} new) exceeds the model's context length "
            f"({context_length} tokens)."
        )
    if (body.bootstrap_room is not None) and not (0 <= body.bootstrap_room < 2**64):
        raise RequestError("bootstrap_room must be a non-negative 64-bit integer")
    sampling = Sampling(
        max_new_tokens=max_new,
        min_new_tokens=sp.min_new_tokens,
        temperature=sp.temperature,
        top_p=sp.top_p,
        top_k=sp.top_k,
        min_p=sp.min_p,
        stop_token_ids=frozenset(sp.stop_token_ids or ()),
        ignore_eos=sp.ignore_eos,
        seed=sp.sampling_seed,
    )
    return GenerateRequest(
        rid=body.rid or uuid.uuid4().hex,
        input_ids=tuple(ids),
        sampling=sampling,
        stream=body.stream,
        bootstrap_host=body.bootstrap_host,
        bootstrap_port=body.bootstrap_port,
        bootstrap_room=body.bootstrap_room,
    )


class AbortBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    rid: str = ""
    abort_all: bool = False


class RoomRegistration(BaseModel):
    """Decode -> prefill bootstrap server: where to write a room's KV, and where to send the aux data."""

    model_config = ConfigDict(extra="forbid")
    room: int
    session: str
    ptr: int
    nbytes: int = Field(ge=0)
    aux_url: str
    prompt_tokens: int = Field(ge=1)


class KVAux(BaseModel):
    """Prefill -> decode, after the KV write: the first token and the sender's checksum (SGLang's aux buffers)."""

    model_config = ConfigDict(extra="forbid")
    room: int
    error: str | None = None
    first_token: int | None = None
    checksum: str | None = None  # hex digest of the KV the prefill computed (kvdata.request_digest)
    nbytes: int = 0
    wire_s: float = 0.0
    transfer_s: float = 0.0  # the move's duration: max(measured write, link model x time_scale), wall seconds
    land_at: float = 0.0  # when the move completes, on the sender's monotonic clock (the same host's clock)
    prefill: dict[str, Any] = Field(default_factory=dict)  # the prefill server's own timings (emulated ms)
