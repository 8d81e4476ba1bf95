"""The model behind the API: loading it, turning requests into decode plans, decoding them.

`ServedModel.plan` runs on the event loop (cheap checks, tokenisation) and refuses a bad
request with an `APIError` before it takes a queue slot; `ServedModel.decode` runs on the
decode worker's thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eetune.config.schema import EetuneConfig, ServeConfig
from eetune.errors import EetuneError
from eetune.exits import EarlyExitModel
from eetune.infer.draft_vocab import load_token_order
from eetune.infer.engine import DecodeResult, DecodeSettings, Engine, exit_settings
from eetune.eval.calibration import run_calibration
from eetune.infer.policy import (
    ExitSettingsError, check_exit_settings, model_exit_rules, resolve_thresholds,
)
from eetune.infer.sampling import TokenLogprob
from eetune.infer.scheduler import BatchRequest
from eetune.serve.errors import APIError
from eetune.serve.protocol import EarlyExitOptions, GenerationRequest
from eetune.serve.text import TextAssembler, TokenSpeller
from eetune.data.chat import chat_prompt_ids, stop_token_ids
from eetune.exits.loading import load_model
from eetune.models import BaseModel


def default_options(serve_cfg: ServeConfig) -> EarlyExitOptions:
    """The early-exit settings of a request that names none, from the `serve` config.

    A threshold left null there is decided per request by `ServedModel.thresholds_for`: the
    one `eetune eval` calibrated for the request's confidence policy, else 0.8.
    """
    return EarlyExitOptions(**serve_cfg.policy())


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int
    max_tokens: int  # the most a request may ask for
    default_max_tokens: int
    context: int  # prompt + new tokens the engine's caches hold


@dataclass(frozen=True)
class DecodePlan:
    """A checked request: what to decode and how."""

    prompt_ids: list[int]
    settings: DecodeSettings
    stop: tuple[str, ...]
    created: float = field(default_factory=time.perf_counter)


@dataclass
class Completion:
    """A decoded request; `text` ends before a stop string and has no special tokens."""

    text: str
    finish_reason: str  # stop | length
    result: DecodeResult
    settings: DecodeSettings
    draft_exit: int | None  # the exit that drafted (self_speculative)
    num_layers: int
    queue_s: float  # waiting for the worker
    # When asked for: one per generated token but a final stop token (it has no text).
    logprobs: list[TokenLogprob] | None = None

    @property
    def prompt_tokens(self) -> int:
        return self.result.prompt_len


class ServedModel:
    """An EarlyExitModel with its tokenizer, engine, default settings and limits."""

    def __init__(
        self,
        name: str,
        model: EarlyExitModel,
        tokenizer: Any,
        defaults: EarlyExitOptions,
        limits: Limits,
        run_dir: str | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.limits = limits
        self.stop_ids = frozenset(stop_token_ids(tokenizer))
        # The run's token frequencies, for drafting over the frequent tokens only (draft_vocab).
        token_order = load_token_order(Path(run_dir), always=tuple(sorted(self.stop_ids))) if run_dir else None
        # Thresholds `eetune eval` calibrated for these exits in this dtype and on this device, per policy.
        self.calibrated = run_calibration(run_dir, model)
        self.engine = Engine(model, max_seq_len=limits.context, token_order=token_order)
        self.vocab_size = self.engine.vocab_size
        self.speller = TokenSpeller(tokenizer)
        self.tokens_generated = 0  # over all requests; written by the decode worker only
        try:
            self.defaults = self.check_options(defaults, prefix="serve.")
        except APIError as exc:
            raise EetuneError(exc.message) from None

    @classmethod
    def from_config(cls, cfg: EetuneConfig, loaded: tuple[BaseModel, EarlyExitModel] | None = None) -> ServedModel:
        """`loaded`: the base model and exits, when loaded elsewhere (a rank's slices on a mesh)."""
        s = cfg.serve
        s.validate_run()
        base, model = loaded or load_model(s.run_dir, **vars(cfg.model))
        max_seq_len = base.model.max_seq_len
        if s.max_prompt_tokens >= max_seq_len:
            raise EetuneError(
                f"serve.max_prompt_tokens={s.max_prompt_tokens} leaves no room to generate in "
                f"model.max_seq_len={max_seq_len}"
            )
        limits = Limits(
            max_prompt_tokens=s.max_prompt_tokens,
            max_tokens=s.max_tokens,
            default_max_tokens=s.default_max_tokens,
            context=min(max_seq_len, s.max_prompt_tokens + s.max_tokens),
        )
        name = s.model_name or (f"{cfg.model.name}+{Path(s.run_dir).name}" if s.run_dir else cfg.model.name)
        return cls(name, model, base.tokenizer, default_options(s), limits, run_dir=s.run_dir)

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    # -- requests -> plans (event loop) ---------------------------------------------------------

    def check_model_name(self, requested: str | None) -> None:
        if requested is not None and requested != self.name:
            raise APIError(404, f"model '{requested}' is not served here; this server serves '{self.name}' "
                           "(see GET /v1/models)", param="model", code="model_not_found")

    def completion_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {self.vocab_size})", param="prompt",
                           code="invalid_value")
        return list(prompt)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            return chat_prompt_ids(self.tokenizer, messages)
        except EetuneError as exc:
            raise APIError(400, f"{exc}: use /v1/completions", param="messages") from None

    def plan(self, prompt_ids: list[int], request: GenerationRequest, prompt_param: str) -> DecodePlan:
        """Check limits and settings; raises APIError (400) for anything this server will not decode."""
        limits, n = self.limits, len(prompt_ids)
        if n == 0:
            raise APIError(400, "the prompt is empty", param=prompt_param, code="invalid_value")
        if n > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {n} tokens; this server takes at most {limits.max_prompt_tokens}",
                           param=prompt_param, code="context_length_exceeded")
        max_tokens = request.requested_max_tokens()
        if max_tokens is None:
            max_tokens = min(limits.default_max_tokens, limits.context - n)
        elif max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} exceeds this server's limit of {limits.max_tokens}",
                           param="max_tokens", code="invalid_value")
        elif n + max_tokens > limits.context:
            raise APIError(400, f"the prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds this server's "
                           f"context of {limits.context} tokens", param="max_tokens", code="context_length_exceeded")
        options = self.check_options((request.early_exit or EarlyExitOptions()).over(self.defaults))
        logit_bias = request.logit_bias_ids()
        if any(not 0 <= token < self.vocab_size for token in logit_bias):
            raise APIError(400, f"logit_bias token ids must be in [0, {self.vocab_size})", param="logit_bias",
                           code="invalid_value")
        threshold, exit_thresholds = self.thresholds_for(options)
        settings = exit_settings(
            options,
            threshold=threshold,
            exit_thresholds=exit_thresholds,
            max_new_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p if request.top_p < 1.0 else None,
            seed=request.seed,
            stop_ids=self.stop_ids,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            logit_bias=logit_bias or None,
            logprobs=request.logprob_count(),
        )
        return DecodePlan(prompt_ids, settings, tuple(request.stop))

    def thresholds_for(self, options: EarlyExitOptions) -> tuple[float, tuple[float, ...] | None]:
        """(threshold, exit_thresholds): the request's, else the calibrated ones for its policy, else
        DEFAULT_THRESHOLD."""
        return resolve_thresholds(options.threshold, options.exit_thresholds, options.confidence, self.calibrated)

    def check_options(self, options: EarlyExitOptions, prefix: str = "early_exit.") -> EarlyExitOptions:
        """Settings that depend on this model's exits; `prefix` names where they came from."""
        if options.threshold is not None and options.exit_thresholds is not None:
            raise APIError(400, f"{prefix}threshold and {prefix}exit_thresholds are both set: give one threshold "
                           "for every exit or one per exit", param=f"{prefix}exit_thresholds")
        try:
            check_exit_settings(options, **model_exit_rules(self.model),
                                has_token_order=self.engine.token_order is not None, prefix=prefix,
                                no_exits="this server has none (it was started without serve.run_dir)")
        except ExitSettingsError as exc:
            raise APIError(400, exc.message, param=f"{prefix}{exc.field}") from None
        return options

    # -- decoding (worker thread) -----------------------------------------------------------------

    def job(self, plan: DecodePlan, on_text: Callable[[str, list[TokenLogprob] | None], None] | None = None,
            cancelled: threading.Event | None = None) -> DecodeJob:
        """The decode of a plan, for the worker: alone, or as a row of the running batch.
        `on_text` gets each piece of final text with the logprobs of the tokens that completed it
        (None unless asked for). Decoding stops at the next token once `cancelled` is set."""
        return DecodeJob(self, plan, on_text, cancelled or threading.Event())

    def decode(
        self,
        plan: DecodePlan,
        cancelled: threading.Event,
        on_text: Callable[[str, list[TokenLogprob] | None], None] | None = None,
    ) -> Completion:
        """Decode a plan alone (see `job`)."""
        return self.job(plan, on_text, cancelled).run_alone()

    def describe(self) -> dict[str, Any]:
        """What /v1/models says about the model beyond OpenAI's fields."""
        return {
            "num_layers": self.num_layers,
            "exit_layers": self.model.exit_layers,
            "max_model_len": self.limits.context,
            "max_prompt_tokens": self.limits.max_prompt_tokens,
            "max_tokens": self.limits.max_tokens,
            "early_exit_defaults": self.defaults.model_dump(),
        }


class DecodeJob:
    """One request's decode: its engine request with streaming callbacks, and its Completion."""

    def __init__(self, served: ServedModel, plan: DecodePlan,
                 on_text: Callable[[str, list[TokenLogprob] | None], None] | None, cancelled: threading.Event) -> None:
        self.served, self.plan, self.on_text, self.cancelled = served, plan, on_text, cancelled
        self.text = TextAssembler(served.tokenizer, plan.stop)
        self.wanted = plan.settings.logprobs is not None
        self.logprobs: list[TokenLogprob] = []
        self.held: list[TokenLogprob] = []  # tokens whose text the assembler still holds back
        self.request = BatchRequest(plan.prompt_ids, plan.settings, on_token=self._on_token,
                                    on_logprob=self._on_logprob)
        self.started = 0.0  # when decoding began: run alone, or joined the batch

    def _on_logprob(self, entry: TokenLogprob) -> None:
        if entry.token not in self.plan.settings.stop_ids:
            self.logprobs.append(entry)
            self.held.append(entry)

    def _release(self, piece: str) -> None:
        if self.on_text is not None and (piece or self.held):
            self.on_text(piece, list(self.held) if self.wanted else None)
        self.held.clear()

    def _on_token(self, token: int, exit_layer: int) -> bool:
        piece = self.text.add(token)
        if piece:
            self._release(piece)
        return self.text.stopped or self.cancelled.is_set()

    def run_alone(self) -> Completion:
        self.started = time.perf_counter()
        r = self.request
        return self.finish(self.served.engine.generate(r.prompt, r.settings, on_token=r.on_token,
                                                       on_logprob=r.on_logprob))

    def finish(self, result: DecodeResult) -> Completion:
        served, s = self.served, self.plan.settings
        served.tokens_generated += len(result.tokens)
        self._release(self.text.finish())
        draft_exit = s.draft_exit if s.draft_exit is not None else (served.model.exit_layers or [None])[-1]
        return Completion(
            text=self.text.text,
            finish_reason="length" if result.stopped_by == "length" and not self.text.stopped else "stop",
            result=result,
            settings=s,
            draft_exit=draft_exit,
            num_layers=served.num_layers,
            queue_s=(self.started or self.request.admitted_at) - self.plan.created,
            logprobs=self.logprobs if self.wanted else None,
        )
