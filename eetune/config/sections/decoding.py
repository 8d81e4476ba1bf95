"""How `generate` and `serve` decode: the exit policy they share (`ExitPolicyConfig`) and
each command's own section on top of it.

Both sections inherit the policy's fields, so their keys stay flat (`generate.mode`,
`serve.threshold`); `ExitPolicyConfig.validate_policy` checks them under either name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Optional

from eetune.config.checks import check_choices, check_positive
from eetune.errors import EetuneError
from eetune.infer.policy import MAX_DRAFT_LEN, check_threshold, threshold_ok


@dataclass
class ExitPolicyConfig:
    """When decoding leaves at an exit, or drafts with one: the fields named like the
    engine's exit settings (eetune.infer.settings.EXIT_FIELDS)."""

    # full | early_exit | self_speculative (the last two need exits: the section's run_dir)
    mode: str = "full"
    # early_exit: leave at the first exit whose confidence >= threshold (1.0 = full model).
    # None: the threshold `eetune eval` calibrated into the run dir for the confidence policy,
    # else 0.8.
    threshold: Optional[float] = None
    # early_exit: one threshold per exit, shallowest first, instead of `threshold` (1.0: never
    # leave at that exit). None: `threshold`, or the per-exit ones `eetune eval` calibrated.
    exit_thresholds: Optional[List[float]] = None
    # max_prob (the paper), learned (the exits' confidence estimators) or frequent (max_prob over the
    # head's rows for the most frequent tokens; needs the run dir's token frequencies).
    confidence: str = "max_prob"
    # self_speculative: the exit that drafts (default: the deepest) and tokens per draft.
    draft_exit: Optional[int] = None
    draft_len: int = 4
    # self_speculative: constant (draft_len every round) | adaptive (as many as pay, up to
    # draft_len, from the running acceptance; none where drafting does not pay).
    draft_schedule: str = "constant"
    # self_speculative: draft over only the N most frequent tokens of the tuning data (FR-Spec;
    # output stays exact). null drafts over the whole vocabulary.
    draft_vocab: Optional[int] = None
    # self_speculative: end a draft early where the drafting exit's learned estimator puts its
    # agreement below this (adaptive draft length; needs exits.confidence). null: always draft_len.
    draft_confidence: Optional[float] = None

    def validate_policy(self, section: str) -> None:
        """The policy's value checks, messages naming `section` (`generate.draft_len=0 ...`).
        Checks that need the model (is draft_exit an exit?) run where it is loaded."""
        check_choices(self, section, "mode", "confidence", "draft_schedule")
        if not 1 <= self.draft_len <= MAX_DRAFT_LEN:
            raise EetuneError(f"{section}.draft_len={self.draft_len} must be in 1..{MAX_DRAFT_LEN}")
        if self.draft_vocab is not None and self.draft_vocab < 1:
            raise EetuneError(
                f"{section}.draft_vocab={self.draft_vocab} must be >= 1 (or null for the whole vocabulary)"
            )
        if self.draft_confidence is not None and not 0.0 < self.draft_confidence <= 1.0:
            raise EetuneError(f"{section}.draft_confidence={self.draft_confidence} must be in (0, 1] (or null)")
        if self.threshold is not None:
            check_threshold(self.threshold, f"{section}.threshold", self.confidence)
        if self.exit_thresholds is not None:
            if self.threshold is not None:
                raise EetuneError(f"{section}.threshold and {section}.exit_thresholds are both set: "
                                  "give one threshold for every exit or one per exit, not both")
            if not self.exit_thresholds:
                raise EetuneError(f"{section}.exit_thresholds is empty: give one threshold per exit (or null)")
            for t in self.exit_thresholds:
                if not threshold_ok(t, self.confidence):
                    raise EetuneError(f"{section}.exit_thresholds has {t}: each threshold must be in (0, 1] "
                                      "(1.0 = never leave at that exit)")

    def policy(self) -> dict[str, Any]:
        """The policy's fields alone, by name: what a request's `early_exit` options and the
        engine's DecodeSettings take."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(ExitPolicyConfig)}
        if fields["exit_thresholds"] is not None:
            fields["exit_thresholds"] = [float(t) for t in fields["exit_thresholds"]]
        return fields


@dataclass
class GenerateConfig(ExitPolicyConfig):
    """Decoding settings for `eetune generate` (the exit policy: `ExitPolicyConfig`'s fields)."""

    prompt: Optional[str] = None
    # Wrap the prompt in the tokenizer's chat template as one user message.
    chat: bool = True
    system: Optional[str] = None
    max_new_tokens: int = 128
    # 0 means greedy.
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0
    # An augment or tune run dir whose exits to load.
    run_dir: Optional[str] = None
    # Colour each streamed token by the exit it left at.
    color: bool = False

    def validate(self) -> None:
        self.validate_policy("generate")
        check_positive(self, "generate", "max_new_tokens")
        if self.temperature < 0:
            raise EetuneError(f"generate.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise EetuneError(f"generate.top_p={self.top_p} must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise EetuneError(f"generate.top_k={self.top_k} must be >= 1")


@dataclass
class ServeConfig(ExitPolicyConfig):
    """`eetune serve`: an OpenAI-compatible HTTP server (presets in configs/serve/).

    `ExitPolicyConfig`'s fields are the early-exit settings of a request that names none; each
    field of a request's `early_exit` object overrides its default here (same meaning as in
    `generate`). A null threshold: the one `eetune eval` calibrated into the run dir for the
    request's confidence policy, else 0.8.
    """

    # An augment or tune run dir whose exits decode; None serves the full model only.
    run_dir: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 8000
    # The model's id in /v1/models and in responses; None: model.name.
    model_name: Optional[str] = None
    # Limits per request: prompt length, and the largest `max_tokens` a request may ask.
    max_prompt_tokens: int = 1536
    max_tokens: int = 512
    # `max_tokens` of a request that gives none (less where the prompt leaves less room).
    default_max_tokens: int = 256
    # Requests admitted at once (decoding or waiting); more get HTTP 503.
    queue_size: int = 32
    # Requests decoding together (continuous batching: they join and leave the running batch at
    # each step), one decoding group at a time: full-model ones, early-exit ones sharing a
    # confidence policy and threshold, or self_speculative ones sharing their draft settings.
    # 1: every request alone, in arrival order.
    max_batch_size: int = 8
    # Prompt tokens prefilled per step of the running batch (chunked prefill): a long prompt joins
    # over several steps instead of stalling the decoding rows for its whole prefill. null: whole
    # prompts at once.
    prefill_chunk: Optional[int] = 256
    log_level: str = "info"

    def validate(self) -> None:
        check_choices(self, "serve")

    def validate_run(self) -> None:
        """`serve`'s checks before loading anything (so a bad config fails in a second); not at
        composition, so `--print-config` shows a preset that still needs serve.run_dir."""
        if not 0 <= self.port <= 65535:
            raise EetuneError(f"serve.port={self.port} must be in 0..65535 (0 picks a free port)")
        for key in ("max_prompt_tokens", "max_tokens", "default_max_tokens", "queue_size", "max_batch_size"):
            if getattr(self, key) < 1:
                raise EetuneError(f"serve.{key}={getattr(self, key)} must be >= 1")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise EetuneError(f"serve.prefill_chunk={self.prefill_chunk} must be >= 1 (or null for whole prompts)")
        if self.default_max_tokens > self.max_tokens:
            raise EetuneError(
                f"serve.default_max_tokens={self.default_max_tokens} exceeds serve.max_tokens={self.max_tokens}"
            )
        self.validate_policy("serve")
        if self.mode != "full" and not self.run_dir:
            raise EetuneError(f"serve.mode={self.mode} needs exits: set serve.run_dir=<augment or tune run dir>")
