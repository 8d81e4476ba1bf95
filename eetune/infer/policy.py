"""The exit policy, in one place: decoding modes, confidence policies, thresholds, exit settings.

Everything that decides whether a token leaves at an exit lives here and nowhere else:

- `MODES` and `CONFIDENCES`, the choice lists the config schema, serve's protocol, the
  engine and eval validate against;
- `POLICIES`, the registry of confidence policies: how a policy computes an exit's confidence
  from the exit's head logits, hidden state and learned estimator, whether it needs the head
  for that (else the head runs only for the tokens that leave), whether it needs an
  estimator, and its threshold range;
- `exits_here` / `first_confident`, the decision itself: a token leaves at the first exit
  whose confidence reaches that exit's threshold (one global threshold, or one per exit:
  `exit_thresholds`, where 1.0 takes an exit out of the decision). The engine calls
  `exits_here` token by token; eval's teacher-forced scoring and policy metrics call
  `first_confident` on the same confidences;
- `check_threshold`, the one range check, and `resolve_thresholds`, the one default: explicit
  values, else the ones `eetune eval` calibrated into the run dir, else DEFAULT_THRESHOLD;
- `check_exit_settings`, the per-exit rules of a set of exit settings (mode, threshold,
  exit_thresholds, confidence, draft_exit, draft_len, draft_schedule, draft_vocab, draft_confidence) for a model, used by the
  Engine, by serve's ServedModel and by the lm-eval model.

Adding a confidence policy: one `register(ConfidencePolicy(...))` below (plus its estimator
module if it has one) and a test; every choice list, check and decision picks it up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from eetune.errors import EetuneError
from eetune.exits.spec import DEFAULT_THRESHOLD
from eetune.infer.draft_schedule import SCHEDULES

MODES = ("full", "early_exit", "self_speculative")
# The most tokens one self-speculative draft may hold (a server's limit per request and in `serve`).
MAX_DRAFT_LEN = 64

# Confidence of a token at an exit: (head logits [r, vocab] float, or None where the policy does
# not need the head; hidden state [r, dim] the head reads; the exit's learned estimator or None)
# -> confidence [r], compared against the threshold.
Score = Callable[[Tensor | None, Tensor, Any], Tensor]


@dataclass(frozen=True)
class ConfidencePolicy:
    name: str
    score: Score
    help: str
    # The head's logits are an input: the head runs for every token that reaches the exit.
    # False: the head runs only for the tokens that leave there.
    needs_head: bool = True
    # Needs a learned estimator on the exit (tune with exits.confidence=linear|mlp).
    needs_estimator: bool = False
    # Thresholds in (low, high]; `high` means never exit early.
    threshold_range: tuple[float, float] = (0.0, 1.0)
    # Scores the logits of a frequent-token head: the exit head's rows for the `frequent_vocab`
    # most frequent tokens (needs the run's token frequencies). With needs_head False the whole
    # head then runs only for the tokens that leave, so they take the exit's own argmax.
    needs_token_order: bool = False


POLICIES: dict[str, ConfidencePolicy] = {}


def register(policy: ConfidencePolicy) -> ConfidencePolicy:
    POLICIES[policy.name] = policy
    return policy


def _max_prob(logits: Tensor | None, hidden: Tensor, estimator: Any) -> Tensor:
    assert logits is not None
    return (logits.amax(-1) - logits.logsumexp(-1)).exp()


def _learned(logits: Tensor | None, hidden: Tensor, estimator: Any) -> Tensor:
    return torch.sigmoid(estimator(hidden).float())


register(ConfidencePolicy("max_prob", _max_prob, "max softmax probability of the exit's head (the paper)"))
register(ConfidencePolicy(
    "learned", _learned, "sigmoid of the exit's learned estimator (the head runs only where it fires)",
    needs_head=False, needs_estimator=True,
))
register(ConfidencePolicy(
    "frequent", _max_prob, "max softmax probability over the exit head's most frequent tokens (the whole head "
    "runs only where it fires)", needs_head=False, needs_token_order=True,
))

# The frequent-token head of the `frequent` policy: the 4096 most frequent tokens, at most an eighth
# of the vocabulary. On SmolLM2 it costs 0.2 of a decoder layer, the whole head 7 (batch 1, CPU).
FREQUENT_VOCAB = 4096


def frequent_vocab(vocab_size: int) -> int:
    """How many of the most frequent tokens the `frequent` policy's head keeps."""
    return max(1, min(FREQUENT_VOCAB, vocab_size // 8))


CONFIDENCES: tuple[str, ...] = tuple(POLICIES)
# Every policy's thresholds lie in (low, high] of this.
THRESHOLD_RANGE = (min(p.threshold_range[0] for p in POLICIES.values()), max(p.threshold_range[1] for p in POLICIES.values()))


def policy(name: str) -> ConfidencePolicy:
    if name not in POLICIES:
        raise EetuneError(f"unknown confidence {name!r}: choose one of {', '.join(POLICIES)}")
    return POLICIES[name]


# -- the decision --------------------------------------------------------------------------------


def never_exits(threshold: float) -> bool:
    """A threshold at the top of the range (1.0) is the full model: no token leaves early."""
    return threshold >= 1.0


# One threshold for every exit, or one per exit (shallowest first).
Thresholds = float | Sequence[float]


def per_exit(threshold: Thresholds, num_exits: int) -> list[float]:
    """One threshold per exit: a single threshold repeated, or the per-exit ones checked for count."""
    if isinstance(threshold, (int, float)):
        return [float(threshold)] * num_exits
    values = [float(t) for t in threshold]
    if len(values) != num_exits:
        raise EetuneError(f"exit_thresholds has {len(values)} thresholds for {num_exits} exits: give one per exit")
    return values


def exits_early(mode: str, threshold: Thresholds) -> bool:
    """Whether tokens can leave at an exit at all under these settings."""
    if mode != "early_exit":
        return False
    if isinstance(threshold, (int, float)):
        return not never_exits(threshold)
    return any(not never_exits(t) for t in threshold)


def settings_thresholds(s: Any) -> Thresholds:
    """The thresholds exit settings `s` decide with: its exit_thresholds where set, else its threshold."""
    return s.threshold if s.exit_thresholds is None else tuple(s.exit_thresholds)


def exit_stops(s: Any, exit_layers: Sequence[int]) -> dict[int, float]:
    """Exit layer -> threshold for the exits a token may leave at under settings `s`, shallowest
    first; an exit whose threshold is 1.0 is left out (never checked), and every exit in full
    and self_speculative modes."""
    thresholds = settings_thresholds(s)
    if not exits_early(s.mode, thresholds):
        return {}
    values = per_exit(thresholds, len(exit_layers))
    return {layer: t for layer, t in zip(exit_layers, values) if not never_exits(t)}


def exits_here(confidence: Tensor, threshold: float) -> Tensor:
    """Bool per token: its confidence at this exit reaches the threshold, so it leaves here."""
    return confidence >= threshold


def first_confident(confidence: Tensor, threshold: Thresholds) -> Tensor:
    """Index of the first exit each token leaves at, from confidence [E, T] (exit by token) and
    one threshold or one per exit; E where it leaves at none (the final layer). Exactly the
    engine's token-by-token decision."""
    num_exits, num_tokens = confidence.shape
    if num_exits == 0 or not exits_early("early_exit", threshold):
        return torch.full((num_tokens,), num_exits, dtype=torch.long)
    values = torch.tensor(per_exit(threshold, num_exits), dtype=confidence.dtype, device=confidence.device)
    fires = exits_here(confidence, values[:, None]) & (values < 1.0)[:, None]
    # argmax finds the first True; a column without any True gets E.
    index = fires.int().argmax(0)
    return torch.where(fires.any(0), index, torch.full_like(index, num_exits))


# -- thresholds ----------------------------------------------------------------------------------


def threshold_ok(value: Any, confidence: str | None = None) -> bool:
    low, high = POLICIES[confidence].threshold_range if confidence in POLICIES else THRESHOLD_RANGE
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low < value <= high


def check_threshold(value: Any, key: str | None = None, confidence: str | None = None) -> None:
    """The one threshold range check. `key` names a config field (`generate.threshold`)."""
    if threshold_ok(value, confidence):
        return
    low, high = POLICIES[confidence].threshold_range if confidence in POLICIES else THRESHOLD_RANGE
    span = f"({low:g}, {high:g}] ({float(high)!r} = never exit early)"
    if key is None:
        raise EetuneError(f"threshold must be in {span}, got {value}")
    raise EetuneError(f"{key}={value} must be in {span}")


def resolve_thresholds(
    threshold: float | None, exit_thresholds: Sequence[float] | None, confidence: str,
    calibrated: Mapping[str, Thresholds],
) -> tuple[float, tuple[float, ...] | None]:
    """(threshold, exit_thresholds) to decode with: the explicit ones, else the ones calibrated
    for the policy (one global threshold or one per exit), else DEFAULT_THRESHOLD everywhere."""
    if exit_thresholds is not None:
        return DEFAULT_THRESHOLD if threshold is None else threshold, tuple(exit_thresholds)
    if threshold is not None:
        return threshold, None
    value = calibrated.get(confidence)
    if value is None:
        return DEFAULT_THRESHOLD, None
    if isinstance(value, (int, float)):
        return float(value), None
    return DEFAULT_THRESHOLD, tuple(float(t) for t in value)


def parse_thresholds(text: str, name: str) -> tuple[float, ...]:
    """"0.9/0.8/1" -> (0.9, 0.8, 1.0): one threshold per exit as a command line writes them
    (`name` says where they came from in the error)."""
    try:
        return tuple(float(part) for part in str(text).split("/"))
    except ValueError:
        raise EetuneError(f"{name} {text!r}: give one threshold per exit joined by '/', e.g. 0.9/0.8/1") from None


def describe_thresholds(threshold: Thresholds) -> str:
    """0.8, or 0.9/0.8/1 for one threshold per exit (shallowest first)."""
    if isinstance(threshold, (int, float)):
        return f"{threshold:g}"
    return "/".join(f"{t:g}" for t in threshold)


# -- exit settings -------------------------------------------------------------------------------


class ExitSettingsError(EetuneError):
    """Bad exit settings; `field` names the offending one (serve turns it into a 400's param)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def check_exit_settings(
    s: Any,
    exit_layers: Sequence[int] | None = None,
    has_estimator: Callable[[int], bool] | None = None,
    has_token_order: bool = True,
    prefix: str = "",
    no_exits: str = "this one has none",
) -> None:
    """The rules of exit settings `s` (anything with the EXIT_FIELDS: DecodeSettings, serve's
    options, ...); raises ExitSettingsError naming the field.

    With `exit_layers` (the model's exits) and `has_estimator(layer)`, also the rules that
    depend on the model. `prefix` names where the settings came from (`serve.`,
    `early_exit.`): messages then read `serve.draft_exit=4 ...`. `no_exits` says why a model
    has no exits (where a mode needs them).
    """

    def name(field: str, value: Any) -> str:
        return f"{prefix}{field}={value}" if prefix else f"{field} {value!r}"

    def fail(field: str, message: str) -> None:
        raise ExitSettingsError(field, message)

    if s.mode not in MODES:
        fail("mode", f"unknown decoding mode {s.mode!r}: choose one of {', '.join(MODES)}")
    if s.confidence not in POLICIES:
        fail("confidence", f"unknown confidence {s.confidence!r}: choose one of {', '.join(POLICIES)}")
    if s.threshold is not None:
        try:
            check_threshold(s.threshold, f"{prefix}threshold" if prefix else None, s.confidence)
        except EetuneError as exc:
            fail("threshold", str(exc))
    per_exit_thresholds = getattr(s, "exit_thresholds", None)
    if per_exit_thresholds is not None:
        if len(per_exit_thresholds) == 0:
            fail("exit_thresholds", f"{prefix}exit_thresholds is empty: give one threshold per exit, or leave it unset")
        for t in per_exit_thresholds:
            if not threshold_ok(t, s.confidence):
                fail("exit_thresholds", f"{prefix}exit_thresholds has {t}: every threshold must be in "
                     f"({POLICIES[s.confidence].threshold_range[0]:g}, {POLICIES[s.confidence].threshold_range[1]:g}] "
                     "(1.0 = never leave at that exit)")
    if s.draft_len is not None and s.draft_len < 1:
        fail("draft_len", f"{prefix}draft_len must be >= 1, got {s.draft_len}")
    if s.draft_schedule not in SCHEDULES:
        fail("draft_schedule", f"unknown draft_schedule {s.draft_schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if s.draft_vocab is not None and s.draft_vocab < 1:
        fail("draft_vocab", f"{prefix}draft_vocab must be >= 1 token, got {s.draft_vocab}")
    if s.draft_confidence is not None and not (_is_number(s.draft_confidence) and 0.0 < s.draft_confidence <= 1.0):
        fail("draft_confidence", f"{prefix}draft_confidence must be in (0, 1], got {s.draft_confidence}")
    if exit_layers is None:
        return
    exits = list(exit_layers)
    if s.mode != "full" and not exits:
        fail("mode", f"{name('mode', s.mode)} needs a model with exits; {no_exits}: use mode 'full'")
    if per_exit_thresholds is not None and len(per_exit_thresholds) != len(exits):
        fail("exit_thresholds", f"{prefix}exit_thresholds has {len(per_exit_thresholds)} thresholds for "
             f"{len(exits)} exits (at {exits}): give one per exit, shallowest first")
    if s.draft_exit is not None and s.draft_exit not in exits:
        fail("draft_exit", f"{name('draft_exit', s.draft_exit)} is not an exit of this model; exits are at {exits}")
    if s.draft_vocab is not None and not has_token_order:
        fail("draft_vocab", f"{prefix}draft_vocab needs token frequencies, and there is no token_order "
             "(tune writes one to the run dir as draft_vocab.safetensors)")
    estimator = has_estimator or (lambda layer: False)
    may_exit = s.mode == "early_exit" and (
        (s.threshold is None and per_exit_thresholds is None) or exits_early(s.mode, settings_thresholds(s))
    )
    if may_exit and POLICIES[s.confidence].needs_token_order and not has_token_order:
        fail("confidence", f"{name('confidence', s.confidence)} needs token frequencies, and there is no token_order "
             "(tune writes one to the run dir as draft_vocab.safetensors)")
    if s.mode == "self_speculative" and s.draft_confidence is not None:
        layer = s.draft_exit if s.draft_exit is not None else exits[-1]
        if not estimator(layer):
            fail("draft_confidence", f"{prefix}draft_confidence needs a learned confidence estimator on the drafting "
                 f"exit {layer}, which has none (tune with exits.confidence=linear|mlp)")
    # Threshold 1.0 never exits (the full model); None is not resolved yet (serve's defaults).
    if may_exit and POLICIES[s.confidence].needs_estimator:
        missing = [layer for layer in exits if not estimator(layer)]
        if missing:
            fail("confidence", f"{name('confidence', s.confidence)} needs an estimator on every exit; exit(s) "
                 f"{missing} have none (tune exits with exits.confidence=linear|mlp, or use confidence 'max_prob')")


def model_exit_rules(model: Any) -> dict[str, Any]:
    """`check_exit_settings` keyword arguments for an EarlyExitModel's exits."""
    return {
        "exit_layers": model.exit_layers,
        "has_estimator": lambda layer: model.exit(layer).confidence is not None,
    }
