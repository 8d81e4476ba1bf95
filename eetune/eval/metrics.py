"""Numbers about exits and exit policies, from per-token tensors (pure functions, no model).

Exit index k (0-based, in exit-layer order) means "left at the k-th exit"; index E (the
number of exits) means "went through every layer" (the final layer). A policy exits at the
first exit whose confidence reaches the threshold, exactly as the decoding engine does;
threshold 1.0 never exits early (the engine's full model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from eetune.infer.policy import first_confident


def perplexity(cross_entropy: float) -> float:
    """exp(CE in nats), inf instead of an overflow."""
    return math.exp(cross_entropy) if cross_entropy < 700 else math.inf


def first_exit(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Index of the first exit with confidence >= threshold, per token; E where none.

    confidence: [E, T] (exit by token). threshold >= 1.0 never exits, like the engine: this is
    the engine's own decision (eetune.infer.policy.first_confident).
    """
    return first_confident(confidence, threshold)


def oracle_exit(agrees: torch.Tensor) -> torch.Tensor:
    """The shallowest exit whose top-1 equals the final layer's, per token; E where none does.

    agrees: [E, T] bool. This is what a perfect confidence policy would do at 100% agreement.
    """
    return first_exit(agrees.float(), 0.5)


def exit_fractions(index: torch.Tensor, num_exits: int) -> list[float]:
    """Fraction of tokens at each exit index 0..E (the last entry: the final layer)."""
    counts = torch.bincount(index, minlength=num_exits + 1).float()
    return (counts / max(len(index), 1)).tolist()


def chosen(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [E + 1, T] picked per token at `index` [T] (the row of the layer it left at)."""
    return values.gather(0, index[None, :])[0]


@dataclass
class ReliabilityBin:
    low: float
    high: float
    count: int
    confidence: float | None  # mean confidence of the bin's tokens (None: empty bin)
    accuracy: float | None  # fraction of them that are correct


def reliability(confidence: torch.Tensor, correct: torch.Tensor, bins: int) -> list[ReliabilityBin]:
    """Equal-width confidence bins over [0, 1]; the last bin includes 1.0."""
    edges = torch.linspace(0.0, 1.0, bins + 1)
    which = torch.clamp((confidence * bins).long(), max=bins - 1)
    out = []
    for b in range(bins):
        members = which == b
        n = int(members.sum())
        out.append(
            ReliabilityBin(
                float(edges[b]),
                float(edges[b + 1]),
                n,
                float(confidence[members].mean()) if n else None,
                float(correct[members].float().mean()) if n else None,
            )
        )
    return out


def expected_calibration_error(bins: Sequence[ReliabilityBin]) -> float:
    """sum over bins of (bin share of tokens) * |accuracy - confidence|."""
    total = sum(b.count for b in bins)
    if total == 0:
        return 0.0
    return sum(b.count / total * abs(b.accuracy - b.confidence) for b in bins if b.count)


@dataclass
class PrecisionRecall:
    precision: float | None  # None: nothing was predicted positive
    recall: float | None  # None: nothing was actually positive
    predicted: int
    actual: int


def precision_recall(predicted: torch.Tensor, actual: torch.Tensor) -> PrecisionRecall:
    """Of bool predictions against bool truth."""
    true_positive = int((predicted & actual).sum())
    n_predicted, n_actual = int(predicted.sum()), int(actual.sum())
    return PrecisionRecall(
        true_positive / n_predicted if n_predicted else None,
        true_positive / n_actual if n_actual else None,
        n_predicted,
        n_actual,
    )


def as_dicts(items: Sequence[ReliabilityBin] | Sequence[PrecisionRecall]) -> list[dict]:
    return [asdict(item) for item in items]
