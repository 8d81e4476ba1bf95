"""What a decode request asks for (`DecodeSettings`) and what it got (`DecodeResult`).

The exit settings (EXIT_FIELDS) are checked by eetune.infer.policy; the sampling ones here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eetune.errors import EetuneError
from eetune.infer.sampling import SamplingParams, TokenLogprob


@dataclass
class DecodeSettings:
    mode: str = "full"  # full | early_exit | self_speculative
    threshold: float = 1.0  # early_exit: exit at the first exit with confidence >= threshold; 1.0 == full
    # early_exit: one threshold per exit, shallowest first, in place of `threshold` (1.0: never
    # leave at that exit, which is then not even checked). None: `threshold` at every exit.
    exit_thresholds: tuple[float, ...] | None = None
    # A confidence policy of eetune.infer.policy.POLICIES: max_prob (max softmax prob of the exit head) |
    # learned (sigmoid of the exit's estimator; the head runs only where it fires) | ...
    confidence: str = "max_prob"
    draft_exit: int | None = None  # self_speculative: exit layer used for drafting (default: the deepest exit)
    draft_len: int = 4  # self_speculative: tokens drafted per verify forward (k); adaptive: the most
    # self_speculative: `constant` drafts draft_len every round; `adaptive` drafts what pays given the
    # row's running acceptance, down to none (a full-model step) (eetune.infer.draft_schedule).
    draft_schedule: str = "constant"
    # self_speculative: draft over only the N most frequent tokens (FR-Spec): the draft head
    # streams N rows instead of the whole vocabulary; verification with the full head keeps the
    # output exact. None drafts over the whole vocabulary. Needs the engine's `token_order`.
    draft_vocab: int | None = None
    # self_speculative: stop a draft early where the drafting exit's learned estimator puts its
    # agreement with the full model below this (adaptive draft length). None: always draft_len.
    draft_confidence: float | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    # Subtracted from the logits of tokens already generated (x 1 / x their count), and a
    # bias added per token id; applied before temperature in every mode, greedy included.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    # Report each token's log-probability and the `logprobs` most likely ones (None: none).
    logprobs: int | None = None


# The fields of DecodeSettings that say how to use the exits; the generate and serve configs,
# serve's per-request options and eval's sweep settings name them the same.
EXIT_FIELDS = (
    "mode", "threshold", "exit_thresholds", "confidence", "draft_exit", "draft_len", "draft_schedule", "draft_vocab", "draft_confidence",
)


def exit_settings(source: Any, **rest: Any) -> DecodeSettings:
    """DecodeSettings with the EXIT_FIELDS `source` has (a config section, request options, ...)
    and everything else from `rest`, which also wins over `source`."""
    fields = {name: getattr(source, name) for name in EXIT_FIELDS if hasattr(source, name)}
    if fields.get("exit_thresholds") is not None:  # a config list or a request's JSON array
        fields["exit_thresholds"] = tuple(fields["exit_thresholds"])
    return DecodeSettings(**{**fields, **rest})


@dataclass
class DecodeResult:
    """One finished request. `tokens` are the new tokens only, a final stop token included.

    exit_layers[i] is the layer token i left at: num_layers for the full model; in
    self_speculative, L for an accepted draft token and num_layers for the verifier's own.
    mean_layers counts backbone layer calls per generated token (a call over several
    positions counts once: decoding streams each layer's weights once per call).
    """

    tokens: list[int]
    exit_layers: list[int]
    prompt_len: int
    prefill_s: float  # prompt forward + first token: time to first token
    decode_s: float  # every later token
    tokens_per_s: float  # decode only: (len(tokens) - 1) / decode_s
    mean_layers: float
    draft_tokens: int = 0
    accepted_tokens: int = 0
    acceptance_rate: float | None = None
    stopped_by: str = "length"  # eos | length | callback (on_token returned True)
    # One per token when settings.logprobs is set: from the distribution the token was
    # chosen from (its exit's head; the full model's for self_speculative), after logit bias
    # and penalties, before temperature.
    logprobs: list[TokenLogprob] | None = None



def sampling_params(s: DecodeSettings, vocab_size: int) -> SamplingParams:
    """The sampling part of `s`, checked (SamplingParams checks temperature, top_k/p, seed)."""
    if s.logprobs is not None and s.logprobs < 0:
        raise EetuneError(f"logprobs must be >= 0 (top tokens per position) or unset, got {s.logprobs}")
    bias = tuple(sorted((int(token), float(value)) for token, value in (s.logit_bias or {}).items()))
    if bias and not all(0 <= token < vocab_size for token, _ in bias):
        raise EetuneError(f"logit_bias token ids must be in [0, {vocab_size}), the model's vocabulary")
    return SamplingParams(s.temperature, s.top_k, s.top_p, s.presence_penalty, s.frequency_penalty, bias)
