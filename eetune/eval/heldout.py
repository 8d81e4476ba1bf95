"""Held-out quality of every exit: cross-entropy and top-1 agreement with the final layer."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eetune.exits.model import EarlyExitModel


@dataclass
class ExitQuality:
    layer: int
    cross_entropy: float  # nats per token
    agreement: float  # fraction of tokens whose top-1 equals the final layer's top-1


@torch.no_grad()
def heldout_quality(model: EarlyExitModel, batch: torch.Tensor) -> dict[int, ExitQuality]:
    """Next-token CE and agreement for every exit and the final layer (key `num_layers`).

    One sequence at a time: only one [seq_len, vocab] logits tensor per exit is alive.
    """
    ce_sum: dict[int, float] = defaultdict(float)
    agree: dict[int, int] = defaultdict(int)
    count = 0
    for sequence in batch:
        inputs, targets = sequence[None, :-1], sequence[1:]
        logits = model(inputs, include_final=True)
        final_top1 = logits[model.num_layers][0].argmax(-1)
        for layer, layer_logits in logits.items():
            ce_sum[layer] += F.cross_entropy(layer_logits[0], targets, reduction="sum").item()
            agree[layer] += int((layer_logits[0].argmax(-1) == final_top1).sum())
        count += len(targets)
    return {
        layer: ExitQuality(layer, ce_sum[layer] / count, agree[layer] / count) for layer in sorted(ce_sum)
    }
