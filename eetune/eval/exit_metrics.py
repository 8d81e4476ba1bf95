"""What held-out token statistics say about exits and exit policies (teacher-forced).

Per exit: CE, perplexity, agreement with the final layer, calibration (reliability bins and
ECE, against the next token and against the final layer's top-1), the learned estimator's
precision/recall. Per policy and threshold: where tokens leave, agreement with the final
layer, and the speedup the cost model gives; the oracle: the shallowest agreeing exit.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from eetune.eval.heldout import TokenStats
from eetune.eval.metrics import (
    as_dicts,
    chosen,
    expected_calibration_error,
    exit_fractions,
    oracle_exit,
    perplexity,
    precision_recall,
    reliability,
)
from eetune.eval.scoring import exit_confidence
from eetune.eval.timing import Costs
from eetune.infer.policy import first_confident


def per_exit_metrics(stats: TokenStats, bins: int, estimator_threshold: float = 0.5) -> list[dict[str, Any]]:
    out = []
    for layer in [*stats.exit_layers, stats.final_layer]:
        view = stats.layers[layer]
        right = view.top1 == stats.labels
        agrees = stats.agrees(layer)
        rel = reliability(view.max_prob, right, bins)
        rel_final = reliability(view.max_prob, agrees, bins)
        estimator = None
        if view.learned is not None:
            estimator = asdict(precision_recall(view.learned >= estimator_threshold, agrees))
        ce = stats.cross_entropy(layer)
        out.append({
            "layer": layer, "final": layer == stats.final_layer, "cross_entropy": ce, "perplexity": perplexity(ce),
            "agreement": stats.agreement(layer), "accuracy": float(right.float().mean()),
            "ece": expected_calibration_error(rel),
            "ece_vs_final": None if layer == stats.final_layer else expected_calibration_error(rel_final),
            "reliability": as_dicts(rel), "reliability_vs_final": as_dicts(rel_final), "estimator": estimator,
        })
    return out


def policy_metrics(stats: TokenStats, costs: Costs, thresholds: list[float], confidences: list[str]) -> dict[str, Any]:
    """Teacher-forced: where each policy sends tokens, its agreement, its modelled speedup (the
    held-out tokens taken as one sequence in order, for the catch-up of skipped layers); the oracle."""
    layers = stats.exit_layers
    stack = [*layers, stats.final_layer]
    n = stats.final_layer  # the final layer's number is the layer count
    top1 = torch.stack([stats.layers[layer].top1 for layer in stack])
    final_top1 = stats.layers[stats.final_layer].top1
    agrees = torch.stack([stats.agrees(layer) for layer in layers])
    policies = []
    for confidence in confidences:
        conf = exit_confidence(stats.layers, layers, confidence)
        if conf is None:  # an exit cannot give this policy's confidence (no estimator)
            continue
        for t in sorted(set(thresholds), reverse=True):
            index = first_confident(conf, t)
            fractions = exit_fractions(index, len(layers))
            policies.append({
                "confidence": confidence, "threshold": t,
                "fractions": {str(layer): f for layer, f in zip(stack, fractions)},
                "agreement": float((chosen(top1, index) == final_top1).float().mean()),
                **_modelled_speed(costs, index, layers, n, confidence if t < 1.0 else "full"),
            })
    index = oracle_exit(agrees)
    fractions = exit_fractions(index, len(layers))
    oracle = {
        "confidence": "oracle", "threshold": None, "fractions": {str(layer): f for layer, f in zip(stack, fractions)},
        "agreement": float((chosen(top1, index) == final_top1).float().mean()),
        **_modelled_speed(costs, index, layers, n, "oracle"),
        "mean_layers": sum(f * layer for f, layer in zip(fractions, stack)),
    }
    return {"policies": policies, "oracle": oracle}


def _modelled_speed(costs: Costs, index: torch.Tensor, layers: list[int], n: int, policy: str) -> dict[str, float]:
    """The speedup, catch-up included, and the catch-up's seconds per token."""
    order = index.tolist()
    return {"speedup": costs.sequence_speedup(order, layers, n, policy),
            "catch_up_s": costs.catch_up_s(order, layers, n) / max(len(order), 1)}


def estimator_metrics(stats: TokenStats, thresholds: list[float]) -> list[dict[str, Any]]:
    out = []
    for layer in stats.exit_layers:
        view = stats.layers[layer]
        if view.learned is None:
            continue
        for t in sorted({0.5, *(t for t in thresholds if t < 1.0)}, reverse=True):
            out.append({"layer": layer, "threshold": t, **asdict(precision_recall(view.learned >= t, stats.agrees(layer)))})
    return out
