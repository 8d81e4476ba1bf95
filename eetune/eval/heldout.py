"""Held-out quality of every exit, token by token: what each exit predicts and how sure it is.

`token_stats` runs held-out sequences through the backbone once and keeps, per layer (every
exit and the final layer) and per predicted position, the four numbers every later metric
needs: log-probability of the true next token, top-1 token, max probability, and at every exit
each confidence policy's confidence (eetune.infer.policy: the engine's own functions; `learned`
only where the exit has an estimator, `frequent` only given the token order the engine decodes
with). Nothing of size vocabulary outlives a sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from eetune.exits.model import EarlyExitModel
from eetune.exits.modules import head_logits, head_rows
from eetune.infer.policy import POLICIES, frequent_vocab


@dataclass
class ExitQuality:
    layer: int
    cross_entropy: float  # nats per token
    # fraction of tokens whose top-1 equals the final layer's top-1 (None where a mesh rank can't see it)
    agreement: Optional[float]


@dataclass
class LayerTokens:
    """One layer's view of every scored position (1-D tensors, one entry per token)."""

    label_logprob: torch.Tensor  # log p(true next token), float
    top1: torch.Tensor  # argmax token, long
    max_prob: torch.Tensor  # max softmax probability, float
    # Exits: confidence policy -> each token's confidence, computed by the engine's own policy
    # functions (eetune.infer.policy) for every policy this exit can give; empty for the final layer.
    confidence: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def learned(self) -> torch.Tensor | None:
        """Sigmoid of the exit's estimator; None without one."""
        return self.confidence.get("learned")


@dataclass
class TokenStats:
    """Per-token statistics of every exit and of the final layer (key `final_layer`)."""

    layers: dict[int, LayerTokens]
    labels: torch.Tensor  # the true next tokens, long
    final_layer: int

    @property
    def exit_layers(self) -> list[int]:
        return sorted(layer for layer in self.layers if layer != self.final_layer)

    @property
    def num_tokens(self) -> int:
        return len(self.labels)

    def cross_entropy(self, layer: int) -> float:
        return float(-self.layers[layer].label_logprob.mean())

    def agrees(self, layer: int) -> torch.Tensor:
        """Bool per token: this layer's top-1 equals the final layer's."""
        return self.layers[layer].top1 == self.layers[self.final_layer].top1

    def agreement(self, layer: int) -> float:
        return float(self.agrees(layer).float().mean())


# Positions per head evaluation: bounds the transient [positions, vocab] logits.
_CHUNK = 512


@torch.no_grad()
def sequence_tokens(
    model: EarlyExitModel, tokens: torch.Tensor, targets: torch.Tensor, token_order: torch.Tensor | None = None
) -> dict[int, LayerTokens]:
    """Every layer's view of predicting targets [n] from the last n positions of tokens [1, m].

    Uses the same pieces as `EarlyExitModel.forward` (layer outputs, exit hidden state, exit
    head), and the confidence policies on the very hidden state and logits the head reads;
    heads run only on the last n positions. `token_order` (token ids, most frequent first, as
    the engine's) gives the `frequent` policy's head.
    """
    return batch_sequence_tokens(model, tokens, [tokens.shape[1]], [targets], token_order)[0]


@torch.no_grad()
def batch_sequence_tokens(
    model: EarlyExitModel, tokens: torch.Tensor, lengths: list[int], targets: list[torch.Tensor],
    token_order: torch.Tensor | None = None,
) -> list[dict[int, LayerTokens]]:
    """`sequence_tokens` for several sequences in one forward: row r of tokens [b, m] holds its
    sequence in its first lengths[r] positions (right padding: attention is causal, so what
    follows a position never reaches it) and predicts targets[r] from the last of them."""
    final = model.num_layers
    sizes = [len(t) for t in targets]
    flat_targets = torch.cat(list(targets))
    states = model.hidden_states(tokens, [*model.exit_layers, final])

    def rows(h: torch.Tensor) -> torch.Tensor:  # [b, m, dim] -> each row's scored positions, [sum n, dim]
        return torch.cat([h[r, length - n : length] for r, (length, n) in enumerate(zip(lengths, sizes))])

    views = {}
    kept = None if token_order is None else token_order[: frequent_vocab(model.backbone.tok_embeddings.num_embeddings)]
    for layer in model.exit_layers:
        hidden = rows(model.exit_hidden(layer, states[layer]))
        head = model.head_weight(layer)
        frequent = None if kept is None else head_rows(head, kept)
        views[layer] = _summarise(lambda r: head_logits(r, head).float(), hidden, flat_targets,
                                  model.exit(layer).confidence, frequent_rows=frequent)
    normed = model.backbone.norm(rows(states[final]))
    views[final] = _summarise(lambda r: model.backbone.output(r).float(), normed, flat_targets, exit=False)
    split = {layer: _split(view, sizes) for layer, view in views.items()}
    return [{layer: per_row[i] for layer, per_row in split.items()} for i in range(len(sizes))]


def _split(view: LayerTokens, sizes: list[int]) -> list[LayerTokens]:
    """One LayerTokens per sequence, from the concatenation of their tokens."""
    columns = [view.label_logprob.split(sizes), view.top1.split(sizes), view.max_prob.split(sizes)]
    confidence = {name: c.split(sizes) for name, c in view.confidence.items()}
    return [
        LayerTokens(columns[0][i], columns[1][i], columns[2][i], {name: c[i] for name, c in confidence.items()})
        for i in range(len(sizes))
    ]


def _summarise(head, hidden: torch.Tensor, targets: torch.Tensor, estimator=None, exit: bool = True,
               frequent_rows: torch.Tensor | None = None) -> LayerTokens:
    """`exit`: also every confidence policy's confidence (an exit's view; the estimator and the
    frequent-token head's rows may be None)."""
    policies = [p for p in POLICIES.values() if exit and (estimator is not None or not p.needs_estimator)
                and (frequent_rows is not None or not p.needs_token_order)]
    # Policies off the hidden state alone run once over every position; head policies per chunk.
    confidence = {
        p.name: p.score(F.linear(hidden, frequent_rows).float() if p.needs_token_order else None, hidden, estimator)
        for p in policies if not p.needs_head
    }
    chunks = []
    for start in range(0, len(targets), _CHUNK):
        rows = hidden[start : start + _CHUNK]
        logits = head(rows)
        logprobs = logits.log_softmax(-1)
        max_logprob, top1 = logprobs.max(-1)
        scores = [p.score(logits, rows, estimator) for p in policies if p.needs_head]
        chunks.append((logprobs.gather(-1, targets[start : start + _CHUNK, None])[:, 0], top1, max_logprob.exp(), *scores))
    label_logprob, top1, max_prob, *scores = (torch.cat(column) for column in zip(*chunks))
    confidence.update(zip((p.name for p in policies if p.needs_head), scores))
    return LayerTokens(label_logprob, top1, max_prob, {name: confidence[name] for name in POLICIES if name in confidence})


def token_stats(model: EarlyExitModel, batch: torch.Tensor, token_order: torch.Tensor | None = None) -> TokenStats:
    """Statistics of next-token prediction over sequences batch [n, seq_len], one sequence at a time."""
    per_sequence = [sequence_tokens(model, sequence[None, :-1], sequence[1:], token_order) for sequence in batch]
    layers = {}
    for layer in per_sequence[0]:
        views = [seq[layer] for seq in per_sequence]
        layers[layer] = LayerTokens(
            torch.cat([v.label_logprob for v in views]),
            torch.cat([v.top1 for v in views]),
            torch.cat([v.max_prob for v in views]),
            {name: torch.cat([v.confidence[name] for v in views]) for name in views[0].confidence},
        )
    return TokenStats(layers, batch[:, 1:].reshape(-1).clone(), model.num_layers)


def heldout_quality(model: EarlyExitModel, batch: torch.Tensor) -> dict[int, ExitQuality]:
    """Next-token CE and agreement for every exit and the final layer (key `num_layers`)."""
    stats = token_stats(model, batch)
    return {
        layer: ExitQuality(layer, stats.cross_entropy(layer), stats.agreement(layer)) for layer in sorted(stats.layers)
    }
