"""Schedules over optimizer steps: the learning rate and the per-exit loss weights."""

from __future__ import annotations

import math


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, decay: str, min_ratio: float) -> float:
    """Multiplier of the base lr at `step` (0-based): linear warmup, then decay to min_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    # The last step (total_steps - 1) lands exactly on min_ratio.
    span = max(total_steps - warmup_steps - 1, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    if decay == "linear":
        shape = 1.0 - progress
    elif decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr decay {decay!r}")
    return min_ratio + (1.0 - min_ratio) * shape


def exit_weight(base: float, step: int, *, weighting: str, warmup_steps: int) -> float:
    """w_i at `step`: constant (also under dynamic token-wise weighting), or warmed up from 0."""
    if weighting in ("constant", "dynamic") or warmup_steps <= 0:
        return base
    progress = min((step + 1) / warmup_steps, 1.0)
    if weighting == "linear":
        return base * progress
    if weighting == "cosine":
        return base * 0.5 * (1.0 - math.cos(math.pi * progress))
    raise ValueError(f"unknown loss weighting {weighting!r}")
