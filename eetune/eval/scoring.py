"""Log-likelihood of text under an exit policy, teacher-forced (multiple choice, lm-eval).

A decoding engine in `early_exit` mode predicts each token from the first exit whose
confidence reaches the threshold; the deeper layers still run later for that position's KV
(exactly, EE-LLM style), so every layer's hidden state at every position equals the full
forward's. The distribution it samples from at position i is therefore the one this module
picks from a single full forward: the first confident exit's, else the final layer's.
`self_speculative` is lossless: its distribution is the full model's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from eetune.errors import EetuneError
from eetune.eval.heldout import LayerTokens, batch_sequence_tokens, sequence_tokens
from eetune.eval.metrics import chosen
from eetune.exits.model import EarlyExitModel
from eetune.infer.policy import MODES, Thresholds, check_threshold, exits_early, first_confident, settings_thresholds
from eetune.infer.policy import policy as confidence_policy

if TYPE_CHECKING:
    from eetune.eval.sweep import Setting
    from eetune.eval.tasks import Task


@dataclass(frozen=True)
class ExitPolicy:
    mode: str = "full"  # full | early_exit | self_speculative
    threshold: float = 1.0
    confidence: str = "max_prob"  # a confidence policy of eetune.infer.policy.POLICIES
    exit_thresholds: tuple[float, ...] | None = None  # one per exit, in place of `threshold`

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise EetuneError(f"unknown decoding mode {self.mode!r}: choose one of {', '.join(MODES)}")
        confidence_policy(self.confidence)
        for t in (self.threshold, *(self.exit_thresholds or ())):
            check_threshold(t, confidence=self.confidence)

    @property
    def thresholds(self) -> Thresholds:
        return settings_thresholds(self)

    @property
    def exits_early(self) -> bool:
        return exits_early(self.mode, self.thresholds)


def exit_confidence(layers: dict[int, LayerTokens], exit_layers: Sequence[int], confidence: str) -> torch.Tensor | None:
    """Confidence [E, T] of policy `confidence` at every exit; None where an exit cannot give it
    (`learned` without an estimator, `frequent` without a token order)."""
    views = [layers[layer].confidence.get(confidence) for layer in exit_layers]
    return None if any(v is None for v in views) else torch.stack(views)


def policy_index(layers: dict[int, LayerTokens], exit_layers: Sequence[int], policy: ExitPolicy) -> torch.Tensor:
    """Exit index per position (len(exit_layers) = the final layer) the policy leaves at."""
    num_tokens = len(next(iter(layers.values())).top1)
    if not policy.exits_early or not exit_layers:
        return torch.full((num_tokens,), len(exit_layers), dtype=torch.long)
    confidence = exit_confidence(layers, exit_layers, policy.confidence)
    if confidence is None:
        if confidence_policy(policy.confidence).needs_token_order:
            raise EetuneError(f"confidence {policy.confidence!r} needs token frequencies (the run dir's "
                              "draft_vocab.safetensors), and none were given")
        missing = [layer for layer in exit_layers if policy.confidence not in layers[layer].confidence]
        raise EetuneError(f"confidence {policy.confidence!r} needs an estimator on every exit; exit(s) {missing} have none")
    return first_confident(confidence, policy.thresholds)


@dataclass
class Scored:
    logprob: float  # sum of log p(continuation token) under the policy
    is_greedy: bool  # every continuation token is the policy's argmax
    exit_layers: list[int]  # the layer each continuation token was predicted from


class PolicyScorer:
    """Scores continuations of a context with an EarlyExitModel under an ExitPolicy (`token_order`:
    the engine's, for the `frequent` policy)."""

    def __init__(self, model: EarlyExitModel, policy: ExitPolicy, token_order: torch.Tensor | None = None) -> None:
        self.model = model
        self.policy = policy
        self.token_order = token_order
        self.stack = [*model.exit_layers, model.num_layers]  # exit index -> layer

    def layer_tokens(self, context: Sequence[int], continuation: Sequence[int]) -> dict[int, LayerTokens]:
        """Every layer's view of each continuation token (see eetune.eval.heldout.sequence_tokens)."""
        if not context or not continuation:
            raise EetuneError("scoring needs a non-empty context and a non-empty continuation")
        device = self.model.backbone.tok_embeddings.weight.device
        ids = torch.tensor([*context, *continuation], device=device)
        return sequence_tokens(self.model, ids[None, :-1], ids[len(context) :], self.token_order)

    def pick(self, layers: dict[int, LayerTokens], continuation: Sequence[int]) -> Scored:
        """The policy's log-likelihood of the continuation, from every layer's view of it."""
        index = policy_index(layers, self.model.exit_layers, self.policy)
        logprob = chosen(torch.stack([layers[layer].label_logprob for layer in self.stack]), index)
        top1 = chosen(torch.stack([layers[layer].top1 for layer in self.stack]), index)
        greedy = top1.tolist() == list(continuation)
        return Scored(float(logprob.sum()), greedy, [self.stack[i] for i in index.tolist()])

    def score(self, context: Sequence[int], continuation: Sequence[int]) -> Scored:
        return self.pick(self.layer_tokens(context, continuation), continuation)

    def score_batch(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Scored]:
        """`score` for several (context, continuation) pairs in one forward, right-padded: each
        pair's numbers equal its own `score`'s (up to float rounding of the batched matmuls)."""
        if not pairs or any(not context or not continuation for context, continuation in pairs):
            raise EetuneError("scoring needs a non-empty context and a non-empty continuation")
        if len(pairs) == 1:
            return [self.score(*pairs[0])]
        device = self.model.backbone.tok_embeddings.weight.device
        inputs = [[*context, *continuation][:-1] for context, continuation in pairs]
        width = max(len(row) for row in inputs)
        # Any token id pads: it comes after every position a row scores, which never sees it.
        tokens = torch.tensor([row + [row[-1]] * (width - len(row)) for row in inputs], device=device)
        targets = [torch.tensor(list(continuation), device=device) for _, continuation in pairs]
        views = batch_sequence_tokens(self.model, tokens, [len(row) for row in inputs], targets, self.token_order)
        return [self.pick(v, continuation) for v, (_, continuation) in zip(views, pairs)]


def choice_accuracy(
    model: EarlyExitModel, tokenizer: Any, task: Task, settings: list[Setting], advance: Callable[[], None],
    token_order: torch.Tensor | None = None,
) -> dict[str, float]:
    """Exact match per setting: the choice with the highest log-likelihood under the setting's exit policy.

    Every layer's view of a choice is computed once (one forward); each setting only picks among them.
    """
    scorers = {s.name: PolicyScorer(model, ExitPolicy(s.mode, s.threshold, s.confidence, s.exit_thresholds), token_order)
               for s in settings}
    views_of = next(iter(scorers.values()))
    correct = dict.fromkeys(scorers, 0)
    for item in task.items:
        context = tokenizer.encode(item.context, add_special_tokens=True)
        # Encode the whole text, then split: the tokens a choice adds after its context.
        continuations = [
            tokenizer.encode(item.context + item.continuation(i), add_special_tokens=True)[len(context) :]
            for i in range(len(item.choices))
        ]
        views = [views_of.layer_tokens(context, continuation) for continuation in continuations]
        for name, scorer in scorers.items():
            scores = [scorer.pick(v, c).logprob for v, c in zip(views, continuations)]
            correct[name] += int(scores.index(max(scores)) == item.answer)
        advance()
    return {name: n / len(task.items) for name, n in correct.items()}
