"""Per-exit thresholds: one threshold per exit, searched where one global threshold leaves speed behind.

A global threshold asks the same confidence of every exit, yet a shallow exit that is wrong
more often, or whose check costs more than it saves, may deserve a stricter one (or none:
1.0, never checked) and a deep one a looser one. On eval's held-out token statistics
(teacher-forced) and its cost model, `per_exit_candidates` searches, for each global
threshold swept, the per-exit thresholds with the best modelled speedup whose agreement with
the final layer is at least the global threshold's. The values tried per exit are the swept
thresholds, a finer grid (PER_EXIT_GRID) and 1.0. With few
exits every combination is measured (the gains need several exits changed at once: on SmolLM2,
a looser exit 8, exit 16 unchecked and a stricter exit 24); past MAX_COMBINATIONS the search is
coordinate ascent from the global threshold (one exit's threshold changed at a time, the best
move kept, until none helps). Where the result is modelled faster by `min_gain`, eval decodes it through
the engine beside the global ones, and calibration picks among everything measured: a
per-exit setting is kept only where it beats every global threshold by more than noise.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from eetune.eval.heldout import TokenStats
from eetune.eval.metrics import chosen
from eetune.eval.scoring import exit_confidence
from eetune.eval.timing import Costs
from eetune.infer.policy import first_confident, never_exits

# A per-exit candidate joins the engine sweep only where the cost model puts it this much above
# the global threshold it was searched from (the model's noise is a few percent).
MIN_GAIN = 0.02
# Values tried at each exit besides the swept thresholds (and 1.0: never checked).
PER_EXIT_GRID = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98)
# Every combination is measured up to this many (17 values at 3 exits: 4913, ~20 s on 4k tokens).
MAX_COMBINATIONS = 5000


@dataclass(frozen=True)
class PerExitPoint:
    thresholds: tuple[float, ...]  # one per exit, shallowest first
    agreement: float  # teacher-forced top-1 agreement with the final layer
    speedup: float  # modelled, the catch-up of skipped layers included
    start: float | None = None  # the global threshold the search started from


class PerExitSearch:
    """Agreement and modelled speedup of per-exit thresholds for one confidence policy, memoised.

    confidence [E, T]: the policy's confidence at each exit for each held-out token; top1
    [E + 1, T]: each exit's and the final layer's top-1; `policy` names the costs to charge.
    """

    def __init__(self, confidence: torch.Tensor, top1: torch.Tensor, costs: Costs, exits: Sequence[int],
                 num_layers: int, policy: str) -> None:
        self.confidence, self.top1, self.costs = confidence, top1, costs
        self.exits, self.num_layers, self.policy = list(exits), num_layers, policy
        self.final_top1 = top1[-1]
        self._seen: dict[tuple[float, ...], PerExitPoint] = {}

    @classmethod
    def from_stats(cls, stats: TokenStats, costs: Costs, confidence: str) -> PerExitSearch:
        exits = stats.exit_layers
        conf = exit_confidence(stats.layers, exits, confidence)
        if conf is None:
            raise ValueError(f"these exits cannot give confidence {confidence!r}")
        top1 = torch.stack([stats.layers[layer].top1 for layer in [*exits, stats.final_layer]])
        return cls(conf, top1, costs, exits, stats.final_layer, confidence)

    def point(self, thresholds: Sequence[float]) -> PerExitPoint:
        key = tuple(float(t) for t in thresholds)
        if key not in self._seen:
            self._seen[key] = self._measure(key)
        return self._seen[key]

    def _measure(self, thresholds: tuple[float, ...]) -> PerExitPoint:
        index = first_confident(self.confidence, thresholds)
        agreement = float((chosen(self.top1, index) == self.final_top1).float().mean())
        # Costs as the engine pays them: an exit whose threshold is 1.0 is never checked.
        checked = [k for k, t in enumerate(thresholds) if not never_exits(t)]
        if not checked:
            return PerExitPoint(thresholds, agreement, 1.0)
        position = {k: i for i, k in enumerate(checked)}
        reduced = [position.get(k, len(checked)) for k in index.tolist()]
        layers = [self.exits[k] for k in checked]
        return PerExitPoint(thresholds, agreement, self.costs.sequence_speedup(reduced, layers, self.num_layers, self.policy))

    def best_of_all(self, start: float, grid: Sequence[float]) -> PerExitPoint:
        """The fastest of every combination of per-exit thresholds from `grid` and 1.0 whose
        agreement is at least that of `start` at every exit (the start itself if none is faster)."""
        floor = self.point([start] * len(self.exits))
        best = floor
        for combo in itertools.product(sorted({float(g) for g in grid} | {1.0}), repeat=len(self.exits)):
            p = self.point(combo)
            if p.agreement >= floor.agreement and p.speedup > best.speedup:
                best = p
        return best

    def best_from(self, start: float, grid: Sequence[float]) -> PerExitPoint:
        """Coordinate ascent from `start` at every exit: the fastest per-exit thresholds (values
        from `grid` and 1.0) whose agreement is at least the start's."""
        values = sorted({float(g) for g in grid} | {1.0})
        current = self.point([start] * len(self.exits))
        floor = current.agreement
        while True:
            moves = [
                self.point([*current.thresholds[:k], value, *current.thresholds[k + 1 :]])
                for k in range(len(self.exits)) for value in values if value != current.thresholds[k]
            ]
            better = [p for p in moves if p.agreement >= floor and p.speedup > current.speedup]
            if not better:
                return current
            current = max(better, key=lambda p: (p.speedup, p.agreement))


def per_exit_candidates(
    stats: TokenStats, costs: Costs, confidence: str, thresholds: Sequence[float], min_gain: float = MIN_GAIN,
) -> list[PerExitPoint]:
    """For each global threshold below 1.0 (highest first), the per-exit thresholds the search
    finds, where the cost model puts them `min_gain` above the global one; none repeated, none
    that is a global threshold in disguise (the same value at every exit)."""
    search = PerExitSearch.from_stats(stats, costs, confidence)
    grid = sorted({float(t) for t in (*thresholds, *PER_EXIT_GRID) if t < 1.0})
    exhaustive = (len(grid) + 1) ** len(search.exits) <= MAX_COMBINATIONS
    found: dict[tuple[float, ...], PerExitPoint] = {}
    for t in sorted({float(t) for t in thresholds if t < 1.0}, reverse=True):
        best = search.best_of_all(t, grid) if exhaustive else search.best_from(t, grid)
        if len(set(best.thresholds)) > 1 and best.speedup >= search.point([t] * len(search.exits)).speedup * (1 + min_gain):
            found.setdefault(best.thresholds, replace(best, start=t))
    return list(found.values())
