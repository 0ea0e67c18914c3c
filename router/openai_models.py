"""OpenAI request bodies (pydantic, validated at the edge) and the response objects the router returns.

Unknown fields are accepted and ignored, as OpenAI-compatible servers do; fields the router cannot honour (n > 1,
logprobs, echo, tools) are refused with a 400 rather than silently dropped. `stop_token_ids` and `ignore_eos` are
SGLang/vLLM extensions passed through to the backend.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from router.errors import OpenAIError

DEFAULT_CHAT_MAX_TOKENS = 512  # when a chat request names no max_tokens (capped by what the context has left)
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _encodable(text: str) -> str:
    """JSON can carry lone surrogates ("\\ud800") that no UTF-8 string, and no tokenizer, can hold: a 400, not a 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"not valid Unicode: lone surrogate U+{ord(text[err.start]):04X} at position {err.start}"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]  # text the router tokenizes or matches


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False
    # vLLM's extension: `usage` on every chunk, so a client can count the tokens of a chunk that carries several
    continuous_usage_stats: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None

    def as_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = [p.model_dump(exclude_none=True) for p in content]
        return {"role": self.role, "content": content}


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # vLLM's extension: the answer's token ids (here in the `ppd` object as `output_ids`), so a client can compare
    # outputs id for id across routers and routes
    return_token_ids: bool = False
    user: str | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def continuous_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.continuous_usage_stats)

    def check_supported(self) -> None:
        if self.n is not None and self.n > 1:
            raise OpenAIError(400, "n > 1 is not supported; send n separate requests", param="n", code="unsupported")
        if len(self.stop_strings()) > 4:
            raise OpenAIError(400, "at most 4 stop sequences", param="stop", code="invalid_value")

    def sampling_params(self, max_new_tokens: int) -> dict[str, Any]:
        """SGLang `sampling_params`. Stop strings stay with the router (it detokenizes); stop ids go to the server."""
        params: dict[str, Any] = {"max_new_tokens": max_new_tokens}
        if self.temperature is not None:
            params["temperature"] = self.temperature
        if self.top_p is not None:
            params["top_p"] = self.top_p
        if self.seed is not None:
            params["sampling_seed"] = self.seed
        if self.stop_token_ids:
            params["stop_token_ids"] = list(self.stop_token_ids)
        if self.ignore_eos:
            params["ignore_eos"] = True
        return params


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    tools: list[dict[str, Any]] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs:
            raise OpenAIError(400, "logprobs are not supported", param="logprobs", code="unsupported")
        if self.tools:
            raise OpenAIError(400, "tools are not supported", param="tools", code="unsupported")


class CompletionRequest(_SamplingFields):
    # A string, or token ids; a batch (list of strings / list of id lists) must hold exactly one prompt.
    prompt: Text | list[int] | list[Text] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise OpenAIError(400, "echo is not supported", param="echo", code="unsupported")
        if self.logprobs:
            raise OpenAIError(400, "logprobs are not supported", param="logprobs", code="unsupported")
        if self.best_of is not None and self.best_of > 1:
            raise OpenAIError(400, "best_of > 1 is not supported", param="best_of", code="unsupported")

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, str):
            return p
        if not p:
            raise OpenAIError(400, "prompt is empty", param="prompt", code="invalid_value")
        if isinstance(p[0], int):
            return p  # type: ignore[return-value]
        if len(p) != 1:
            raise OpenAIError(
                400,
                "batched prompts are not supported; send one prompt per request",
                param="prompt",
                code="unsupported",
            )
        return p[0]  # type: ignore[return-value]


# --- responses -------------------------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def now() -> int:
    return int(time.time())


def chat_response(rid: str, model: str, text: str, finish_reason: str | None, usage_obj: dict, ppd: dict) -> dict:
    return {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_obj,
        "ppd": ppd,
    }


def chat_chunk(rid: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    return {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }


def completion_response(rid: str, model: str, text: str, finish_reason: str | None, usage_obj: dict, ppd: dict) -> dict:
    return {
        "id": f"cmpl-{rid}",
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage_obj,
        "ppd": ppd,
    }


def completion_chunk(rid: str, model: str, created: int, text: str | None, finish_reason: str | None = None) -> dict:
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
    return {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": model, "choices": choices}


def stream_chunks(endpoint: str, rid: str, model: str):
    """(opening chunk or None, chunk(text, finish_reason, empty=False)) for a chat or completions stream.
    `chunk(None, reason)` closes the choice; `chunk(None, None, empty=True)` has no choices (the usage chunk)."""
    created = now()
    if endpoint == "chat":

        def chat_first() -> dict | None:
            return chat_chunk(rid, model, created, {"role": "assistant", "content": ""})

        def chat_next(text: str | None, finish: str | None, empty: bool = False) -> dict:
            delta = None if empty else ({"content": text} if text is not None else {})
            return chat_chunk(rid, model, created, delta, finish)

        return chat_first, chat_next

    def completion_next(text: str | None, finish: str | None, empty: bool = False) -> dict:
        return completion_chunk(rid, model, created, None if empty else (text or ""), finish)

    return (lambda: None), completion_next


def models_list(served_name: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": served_name, "object": "model", "created": created, "owned_by": "ppd"}]}
