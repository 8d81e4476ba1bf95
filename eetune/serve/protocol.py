"""OpenAI's wire format: request models (validated by pydantic) and the JSON we answer with.

Requests are strict: a wrongly typed value or an unknown parameter is a 400, as with OpenAI.
OpenAI parameters this server cannot honour are named and refused (400, code
`unsupported_parameter`) unless they carry their default value (`n: 1`, `tools: []`, ...);
a few that do not change the answer (`user`, `metadata`, `store`, `service_tier`,
`parallel_tool_calls`) are accepted and ignored. Beyond OpenAI's fields, a request may carry
`early_exit: {mode, threshold, confidence, draft_exit, draft_len, draft_schedule, draft_vocab,
draft_confidence}`; each field it gives overrides the server's default. Responses carry the
decoding statistics in an `early_exit` object beside `usage`.
"""

from __future__ import annotations

import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from eetune.infer.draft_schedule import SCHEDULES
from eetune.infer.policy import CONFIDENCES, MAX_DRAFT_LEN, MODES, THRESHOLD_RANGE
from eetune.infer.sampling import SEED_MAX, SEED_MIN, TokenLogprob

if TYPE_CHECKING:
    from eetune.serve.service import Completion
    from eetune.serve.text import TokenSpeller

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20  # chat, as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # completions, as OpenAI
# JSON has no -inf; OpenAI reports impossible tokens at -9999.
_LOGPROB_FLOOR = -9999.0


def unsupported(name: str, why: str) -> PydanticCustomError:
    """A parameter this server does not implement (errors.validation_error makes it a 400 naming it)."""
    return PydanticCustomError("unsupported", "{message}", {"message": f"'{name}' is not supported: {why}"})


def _only_if(ok: Callable[[Any], bool], why: str) -> AfterValidator:
    """Accept a parameter only with a value that asks for nothing unsupported."""

    def check(value: Any, info: ValidationInfo) -> Any:
        if not ok(value):
            raise unsupported(str(info.field_name), why)
        return value

    return AfterValidator(check)


def _unset(value: Any) -> bool:
    return value is None


def _logit_bias(value: dict[str, float] | None) -> dict[str, float] | None:
    """`logit_bias`: token-id strings -> bias in [-100, 100] (the ids are checked against the vocabulary later)."""
    for key, bias in (value or {}).items():
        if not key.strip().lstrip("-").isdigit():
            raise ValueError(f"keys must be token ids (integers as strings), got {key!r}")
        if not -100.0 <= bias <= 100.0:
            raise ValueError(f"biases must be in [-100, 100], got {bias} for token {key}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class EarlyExitOptions(_Strict):
    """How to decode; a field left out (or null) takes the server's default."""

    # Choices and ranges from eetune.infer.policy; the per-policy threshold range and the rules
    # that depend on the model's exits are checked by ServedModel.check_options.
    mode: Literal[MODES] | None = None  # type: ignore[valid-type]
    threshold: float | None = Field(None, gt=THRESHOLD_RANGE[0], le=THRESHOLD_RANGE[1])
    # One threshold per exit, shallowest first, instead of `threshold` (1.0: never leave there).
    exit_thresholds: list[Annotated[float, Field(gt=THRESHOLD_RANGE[0], le=THRESHOLD_RANGE[1])]] | None = Field(
        None, min_length=1)
    confidence: Literal[CONFIDENCES] | None = None  # type: ignore[valid-type]
    draft_exit: int | None = None
    draft_len: int | None = Field(None, ge=1, le=MAX_DRAFT_LEN)
    draft_schedule: Literal[SCHEDULES] | None = None  # type: ignore[valid-type]
    draft_vocab: int | None = Field(None, ge=1)
    draft_confidence: float | None = Field(None, gt=0.0, le=1.0)

    def over(self, defaults: EarlyExitOptions) -> EarlyExitOptions:
        """These options with every field left out taken from `defaults`."""
        given = {key: value for key, value in self.model_dump().items() if value is not None}
        # A request's one threshold replaces the server's per-exit ones, and the other way round.
        if "threshold" in given and "exit_thresholds" not in given:
            given["exit_thresholds"] = None
        if "exit_thresholds" in given and "threshold" not in given:
            given["threshold"] = None
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
    n: Annotated[int | None, _only_if(lambda n: n in (None, 1), "this server returns one choice per request (n=1)")] = (
        Field(1, ge=1)
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[list[str], BeforeValidator(_stop_strings)] = Field(default_factory=list)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    # Applied before temperature, in every mode; penalties count generated tokens only.
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: Annotated[dict[str, float] | None, AfterValidator(_logit_bias)] = None
    early_exit: EarlyExitOptions | None = None
    # Accepted and ignored: they do not change the answer.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprob_count(self) -> int | None:
        """How many most likely tokens to report per position; None: no logprobs at all."""
        return None

    def logit_bias_ids(self) -> dict[int, float]:
        return {int(key): bias for key, bias in (self.logit_bias or {}).items()}


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
    # The logprobs of each token and of the `logprobs` most likely ones.
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: Annotated[bool | None, _only_if(lambda v: not v, "the prompt is not echoed (echo=false)")] = None
    best_of: Annotated[int | None, _only_if(lambda v: v in (None, 1), "one candidate per request (best_of=1)")] = (
        Field(None, ge=1)
    )
    suffix: Annotated[str | None, _only_if(_unset, "no insertion (suffix=null)")] = None

    def logprob_count(self) -> int | None:
        return self.logprobs


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


def _text_format(value: Any) -> bool:
    return value is None or value == {"type": "text"}


def _no_tools(value: Any) -> bool:
    return value is None or value == []


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions: a conversation, rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    # The newer name of max_tokens; wins when both are given.
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # Accepted and ignored: there are never tools to call in parallel.
    parallel_tool_calls: bool | None = None
    # Refused unless they ask for nothing (or for the default).
    tools: Annotated[Any, _only_if(_no_tools, "this server does not call tools")] = None
    tool_choice: Annotated[Any, _only_if(lambda v: v in (None, "none"), "this server does not call tools")] = None
    functions: Annotated[Any, _only_if(_no_tools, "this server does not call functions")] = None
    function_call: Annotated[Any, _only_if(lambda v: v in (None, "none"), "this server does not call functions")] = (
        None
    )
    response_format: Annotated[Any, _only_if(_text_format, 'only {"type": "text"} output is produced')] = None
    modalities: Annotated[Any, _only_if(lambda v: v in (None, ["text"]), "this model outputs text only")] = None
    audio: Annotated[Any, _only_if(_unset, "this model outputs text only")] = None
    prediction: Annotated[Any, _only_if(_unset, "no predicted outputs")] = None
    reasoning_effort: Annotated[Any, _only_if(_unset, "this model does not reason separately")] = None
    web_search_options: Annotated[Any, _only_if(_unset, "no web search")] = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def turns(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


# -- responses ---------------------------------------------------------------------------------


def statistics(completion: Completion) -> dict[str, Any]:
    """The `early_exit` object of a response: how this request was decoded and what it cost."""
    s, r = completion.settings, completion.result
    early, speculative = s.mode == "early_exit", s.mode == "self_speculative"
    return {
        "mode": s.mode,
        "threshold": s.threshold if early and s.exit_thresholds is None else None,
        "exit_thresholds": list(s.exit_thresholds) if early and s.exit_thresholds is not None else None,
        "confidence": s.confidence if early else None,
        "draft_exit": completion.draft_exit if speculative else None,
        "draft_len": s.draft_len if speculative else None,
        "draft_schedule": s.draft_schedule if speculative else None,
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
    """One request's response and stream chunks, sharing its id, creation time and model name.

    `speller` spells token ids for the `logprobs` of a request that asked for them.
    """

    prefix = ""
    object_name = ""
    chunk_object_name = ""

    def __init__(self, model: str, speller: TokenSpeller | None = None) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model
        self.speller = speller

    def _envelope(self, object_name: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def response(self, completion: Completion) -> dict[str, Any]:
        choice = {"index": 0, **self._full_choice(completion.text), "logprobs": self.logprobs(completion.logprobs),
                  "finish_reason": completion.finish_reason}
        return self._envelope(self.object_name, [choice], usage=usage(completion), early_exit=statistics(completion))

    def opening_chunk(self) -> dict[str, Any] | None:
        return None

    def chunk(self, delta: str, logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
        """A piece of text, with the logprobs of the tokens whose text completed it."""
        choice = {"index": 0, **self._delta_choice(delta), "logprobs": self.logprobs(logprobs), "finish_reason": None}
        return self._envelope(self.chunk_object_name, [choice])

    def closing_chunk(self, completion: Completion) -> dict[str, Any]:
        """The chunk with the finish reason; it also carries the statistics."""
        choice = {"index": 0, **self._delta_choice(None), "logprobs": None, "finish_reason": completion.finish_reason}
        return self._envelope(self.chunk_object_name, [choice], early_exit=statistics(completion))

    def usage_chunk(self, completion: Completion) -> dict[str, Any]:
        """Sent last when `stream_options.include_usage` is set, as OpenAI does."""
        return self._envelope(self.chunk_object_name, [], usage=usage(completion))

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        """The choice's `logprobs` for these tokens; None when the request asked for none."""
        if entries is None or self.speller is None:
            return None
        return self._logprobs(entries, self.speller)

    @abstractmethod
    def _full_choice(self, text: str) -> dict[str, Any]:
        """The choice's content in a whole response."""

    @abstractmethod
    def _delta_choice(self, delta: str | None) -> dict[str, Any]:
        """The choice's content in a stream chunk (None: the closing chunk)."""

    @abstractmethod
    def _logprobs(self, entries: list[TokenLogprob], speller: TokenSpeller) -> dict[str, Any]:
        """OpenAI's logprobs object of this endpoint."""


def _logprob(value: float) -> float:
    return max(value, _LOGPROB_FLOOR)


class CompletionFormat(ResponseFormat):
    prefix = "cmpl"
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def __init__(self, model: str, speller: TokenSpeller | None = None) -> None:
        super().__init__(model, speller)
        self._offset = 0  # text_offset of the next token: counts on across stream chunks

    def _full_choice(self, text: str) -> dict[str, Any]:
        return {"text": text}

    def _delta_choice(self, delta: str | None) -> dict[str, Any]:
        return {"text": delta or ""}

    def _logprobs(self, entries: list[TokenLogprob], speller: TokenSpeller) -> dict[str, Any]:
        tokens, offsets = [], []
        for entry in entries:
            tokens.append(speller.text(entry.token))
            offsets.append(self._offset)
            self._offset += len(tokens[-1])
        # The chosen token is always listed too, so up to logprobs + 1 entries (as OpenAI).
        tops = [{**{speller.text(t): _logprob(lp) for t, lp in e.top}, speller.text(e.token): _logprob(e.logprob)}
                for e in entries]
        return {"tokens": tokens, "token_logprobs": [_logprob(e.logprob) for e in entries], "top_logprobs": tops,
                "text_offset": offsets}


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

    def _logprobs(self, entries: list[TokenLogprob], speller: TokenSpeller) -> dict[str, Any]:
        def spelled(token: int, logprob: float) -> dict[str, Any]:
            return {"token": speller.text(token), "logprob": _logprob(logprob), "bytes": list(speller.bytes(token))}

        content = [{**spelled(e.token, e.logprob), "top_logprobs": [spelled(t, lp) for t, lp in e.top]}
                   for e in entries]
        return {"content": content, "refusal": None}
