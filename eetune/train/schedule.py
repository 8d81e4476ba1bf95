"""Schedules over optimizer steps: the learning rate, the per-exit loss weights, and when to stop."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


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


@dataclass
class FlatStop:
    """Stops tuning once held-out exit losses flatten.

    Each held-out evaluation is an improvement if some exit's CE falls more than `min_delta`
    (relative) below that exit's best so far; after `patience` evaluations in a row without
    one, `update` returns True. Its fields are plain values so the trainer checkpoints them.
    """

    patience: int
    min_delta: float
    best: dict[str, float] = field(default_factory=dict)
    evals_without_gain: int = 0

    def update(self, heldout_ce: dict[int, float]) -> bool:
        improved = False
        for layer, ce in heldout_ce.items():
            best = self.best.get(str(layer))
            if best is None or ce < best * (1.0 - self.min_delta):
                improved = True
            if best is None or ce < best:
                self.best[str(layer)] = ce
        self.evals_without_gain = 0 if improved else self.evals_without_gain + 1
        return self.fired()

    def fired(self) -> bool:
        """Whether the last `patience` evaluations brought no gain."""
        return self.patience > 0 and self.evals_without_gain >= self.patience

    def state_dict(self) -> dict:
        return {"best": dict(self.best), "evals_without_gain": self.evals_without_gain}

    def load_state_dict(self, state: dict) -> None:
        self.best = dict(state["best"])
        self.evals_without_gain = int(state["evals_without_gain"])
