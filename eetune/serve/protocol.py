"""OpenAI's wire format: request models (validated by pydantic) and the JSON we answer with.

Requests are strict: a wrongly typed value or an unknown parameter is a 400, as with OpenAI.
Beyond OpenAI's fields, a request may carry `early_exit: {mode, threshold, confidence,
draft_exit, draft_len, draft_vocab, draft_confidence}`; each field it gives overrides the server's default. Responses carry
the decoding statistics in an `early_exit` object beside `usage`.
"""

from __future__ import annotations

import json
import time
import uuid
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from eetune.serve.service import Completion

MAX_STOP_STRINGS = 4
MAX_DRAFT_LEN = 64


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class EarlyExitOptions(_Strict):
    """How to decode; a field left out (or null) takes the server's default."""

    mode: Literal["full", "early_exit", "self_speculative"] | None = None
    threshold: float | None = Field(None, gt=0.0, le=1.0)
    confidence: Literal["max_prob", "learned"] | None = None
    draft_exit: int | None = None
    draft_len: int | None = Field(None, ge=1, le=MAX_DRAFT_LEN)
    draft_vocab: int | None = Field(None, ge=1)
    draft_confidence: float | None = Field(None, gt=0.0, le=1.0)

    def over(self, defaults: EarlyExitOptions) -> EarlyExitOptions:
        """These options with every field left out taken from `defaults`."""
        given = {key: value for key, value in self.model_dump().items() if value is not None}
        return defaults.model_copy(update=given)


class StreamOptions(_Strict):
    include_usage: bool = False


def _stop_strings(value: Any) -> Any:
    """`stop`: a string or a list of up to four, each non-empty; normalised to a list."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ValueError("stop must be a string or a list of strings")
    if len(value) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(value)}")
    if any(not s for s in value):
        raise ValueError("stop strings must not be empty")
    return value


class GenerationRequest(_Strict):
    """What both endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    # OpenAI's defaults: sampling at temperature 1 unless the request says otherwise (0 = greedy).
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[list[str], BeforeValidator(_stop_strings)] = Field(default_factory=list)
    seed: int | None = None
    user: str | None = None
    early_exit: EarlyExitOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n={n} is not supported: this server returns one choice per request (n=1)")
        return n

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


def _one_prompt(value: Any) -> Any:
    """`prompt`: a string, a list holding one string, or a list of token ids."""
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        if len(value) > 1:
            raise ValueError(f"got {len(value)} prompts: this server takes one prompt per request")
        return value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    raise ValueError("prompt must be a string, a list with one string, or a list of token ids")


class CompletionRequest(GenerationRequest):
    """POST /v1/completions: a raw prompt, continued as is (no chat template)."""

    prompt: Annotated[str | list[int], BeforeValidator(_one_prompt)]


def _message_text(value: Any) -> Any:
    """Message content: a string, or a list of text parts `{"type": "text", "text": ...}` (joined)."""
    if not isinstance(value, list):
        return value
    texts = []
    for part in value:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise ValueError('content parts must be text parts {"type": "text", "text": "..."}: '
                             "this model reads text only")
        texts.append(part["text"])
    return "".join(texts)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, BeforeValidator(_message_text)]
    name: str | None = None


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions: a conversation, rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    # The newer name of max_tokens; wins when both are given.
    max_completion_tokens: int | None = Field(None, ge=1)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def turns(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


# -- responses ---------------------------------------------------------------------------------


def statistics(completion: Completion) -> dict[str, Any]:
    """The `early_exit` object of a response: how this request was decoded and what it cost."""
    s, r = completion.settings, completion.result
    early, speculative = s.mode == "early_exit", s.mode == "self_speculative"
    return {
        "mode": s.mode,
        "threshold": s.threshold if early else None,
        "confidence": s.confidence if early else None,
        "draft_exit": completion.draft_exit if speculative else None,
        "draft_len": s.draft_len if speculative else None,
        "draft_vocab": s.draft_vocab if speculative else None,
        "draft_confidence": s.draft_confidence if speculative else None,
        "num_layers": completion.num_layers,
        "exit_layers": r.exit_layers,
        "mean_layers": r.mean_layers,
        "acceptance_rate": r.acceptance_rate,
        "draft_tokens": r.draft_tokens,
        "accepted_tokens": r.accepted_tokens,
        "tokens_per_s": r.tokens_per_s,
        "time_to_first_token_s": r.prefill_s,
        "decode_s": r.decode_s,
        "queue_s": completion.queue_s,
    }


def usage(completion: Completion) -> dict[str, int]:
    prompt, generated = completion.prompt_tokens, len(completion.result.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


class ResponseFormat(ABC):
    """One request's response and stream chunks, sharing its id, creation time and model name."""

    prefix = ""
    object_name = ""
    chunk_object_name = ""

    def __init__(self, model: str) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model

    def _envelope(self, object_name: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def response(self, completion: Completion) -> dict[str, Any]:
        choice = {"index": 0, **self._full_choice(completion.text), "logprobs": None,
                  "finish_reason": completion.finish_reason}
        return self._envelope(self.object_name, [choice], usage=usage(completion), early_exit=statistics(completion))

    def opening_chunk(self) -> dict[str, Any] | None:
        return None

    def chunk(self, delta: str) -> dict[str, Any]:
        choice = {"index": 0, **self._delta_choice(delta), "logprobs": None, "finish_reason": None}
        return self._envelope(self.chunk_object_name, [choice])

    def closing_chunk(self, completion: Completion) -> dict[str, Any]:
        """The chunk with the finish reason; it also carries the statistics."""
        choice = {"index": 0, **self._delta_choice(None), "logprobs": None, "finish_reason": completion.finish_reason}
        return self._envelope(self.chunk_object_name, [choice], early_exit=statistics(completion))

    def usage_chunk(self, completion: Completion) -> dict[str, Any]:
        """Sent last when `stream_options.include_usage` is set, as OpenAI does."""
        return self._envelope(self.chunk_object_name, [], usage=usage(completion))

    @abstractmethod
    def _full_choice(self, text: str) -> dict[str, Any]:
        """The choice's content in a whole response."""

    @abstractmethod
    def _delta_choice(self, delta: str | None) -> dict[str, Any]:
        """The choice's content in a stream chunk (None: the closing chunk)."""


class CompletionFormat(ResponseFormat):
    prefix = "cmpl"
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def _full_choice(self, text: str) -> dict[str, Any]:
        return {"text": text}

    def _delta_choice(self, delta: str | None) -> dict[str, Any]:
        return {"text": delta or ""}


class ChatFormat(ResponseFormat):
    prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def _full_choice(self, text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}}

    def _delta_choice(self, delta: str | None) -> dict[str, Any]:
        return {"delta": {} if delta is None else {"content": delta}}

    def opening_chunk(self) -> dict[str, Any]:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self._envelope(self.chunk_object_name, [choice])
