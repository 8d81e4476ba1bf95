"""The decode-time cost model: measured seconds of one layer step and one head at batch 1.

Measured once per evaluation with the engine's own pieces (`Generator.run_layers` over a
KV cache, the exit modules, `F.linear` with the exit's head weight + the max-probability the
engine computes), then used to cost what a policy does per token: the layers it runs, the
exit modules and heads it evaluates on the way, and the head of the layer it leaves at.

Skipped layers still owe KV entries; the engine runs them later in the same call as the
next token (one call over several positions). Such a call is not free: a layer over r
positions is timed for r = 1..4 (`layer_rows_s`), and `sequence_speedup` replays a token
sequence's exits in order to charge every layer call for the positions it carries. On a CPU
whose multi-row matmuls cost per row (bf16 without native bf16 units), the catch-up costs what
the exit saved; where they cost little more than one row (bandwidth-bound), it is cheap.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from eetune.exits.model import EarlyExitModel
from eetune.exits.modules import head_logits
from eetune.infer.generate import Generator
from eetune.infer.policy import POLICIES as CONFIDENCE_POLICIES
from eetune.infer.policy import ConfidencePolicy, frequent_vocab

# full, every confidence policy of eetune.infer.policy, oracle.
POLICIES = ("full", *CONFIDENCE_POLICIES, "oracle")


@dataclass
class Costs:
    """Seconds per call at batch 1 (one token)."""

    layer_s: float  # one decoder layer with a KV cache of `context` positions
    head_s: float  # an exit's vocabulary head + max probability
    final_s: float  # final norm + LM head
    exit_s: dict[int, float]  # each exit's module (norm / MLP / block) on one token
    estimator_s: dict[int, float]  # each exit's learned confidence estimator, where it has one
    context: int  # cached positions the layer step attended to
    frequent_head_s: float = 0.0  # the `frequent` policy's head (the most frequent tokens' rows) + max probability
    # One layer over 1, 2, ... positions (entry r - 1); empty: not measured, catch-up counted as free.
    layer_rows_s: tuple[float, ...] = ()

    def full_token(self, num_layers: int) -> float:
        return num_layers * self.layer_s + self.final_s

    def layer_over(self, rows: int) -> float:
        """One layer call over `rows` positions; past the measured counts, extrapolated linearly."""
        measured = self.layer_rows_s or (self.layer_s,)
        if rows <= len(measured):
            return measured[rows - 1]
        slope = measured[-1] - measured[-2] if len(measured) > 1 else 0.0
        return measured[-1] + (rows - len(measured)) * slope

    def catch_up_s(self, index: Sequence[int], exit_layers: Sequence[int], num_layers: int) -> float:
        """Seconds that carrying skipped positions through deeper layers adds to decoding a token
        sequence whose tokens leave, in order, at exit indices `index` (E: the final layer).

        As the engine does: a token that leaves at depth d leaves its position pending at d; the
        next token that goes deeper takes it along from d, so each layer above d runs over one
        more position; reaching the final layer clears every pending position.
        """
        one = self.layer_over(1)
        pending: list[tuple[int, int]] = []  # (depth, positions), newest (shallowest) last
        extra = 0.0
        for k in index:
            depth = exit_layers[k] if k < len(exit_layers) else num_layers
            carried, level = 0, 0
            while pending and pending[-1][0] < depth:
                joined_at, positions = pending.pop()
                extra += (joined_at - level) * (self.layer_over(1 + carried) - one)
                carried, level = carried + positions, joined_at
            extra += (depth - level) * (self.layer_over(1 + carried) - one)
            if depth < num_layers:
                pending.append((depth, carried + 1))
        return extra

    def sequence_speedup(self, index: Sequence[int], exit_layers: Sequence[int], num_layers: int,
                         policy: str) -> float:
        """Full-model cost over the policy's, for tokens decoded in order leaving at `index`,
        the catch-up of skipped layers included."""
        if len(index) == 0:
            return 1.0
        per_index = self.index_costs(exit_layers, num_layers, policy)
        total = sum(per_index[k] for k in index) + self.catch_up_s(index, exit_layers, num_layers)
        return len(index) * self.full_token(num_layers) / total

    def index_costs(self, exit_layers: Sequence[int], num_layers: int, policy: str) -> list[float]:
        """Cost of one token that leaves at exit index k = 0..E (E: the final layer), per policy.

        full checks nothing (threshold 1.0: the engine runs the plain model); a confidence
        policy checks every exit up to the one it leaves at: with the head where it needs the
        head (max_prob), else with its estimator or frequent-token head, running the whole head
        only where it leaves (learned, frequent); oracle knows where to leave and evaluates that
        exit alone.
        """
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}")
        costs = []
        for k in range(len(exit_layers) + 1):
            depth = exit_layers[k] if k < len(exit_layers) else num_layers
            checked = exit_layers[: k + 1]
            if policy == "full":
                checks = 0.0
            elif policy in CONFIDENCE_POLICIES:
                p = CONFIDENCE_POLICIES[policy]
                if p.needs_head:
                    checks = sum(self.exit_s[layer] + self.head_s + self._estimator_s(p, layer) for layer in checked)
                else:
                    frequent = self.frequent_head_s if p.needs_token_order else 0.0
                    checks = sum(self.exit_s[layer] + self._estimator_s(p, layer) + frequent for layer in checked)
                    checks += self.head_s if k < len(exit_layers) else 0.0
            else:
                checks = self.exit_s[exit_layers[k]] + self.head_s if k < len(exit_layers) else 0.0
            costs.append(depth * self.layer_s + checks + (self.final_s if k == len(exit_layers) else 0.0))
        return costs

    def _estimator_s(self, policy: ConfidencePolicy, layer: int) -> float:
        return self.estimator_s.get(layer, 0.0) if policy.needs_estimator else 0.0

    def speedup(self, fractions: Sequence[float], exit_layers: Sequence[int], num_layers: int, policy: str) -> float:
        """Full-model cost per token over the policy's mean cost per token, given exit fractions
        (the catch-up of skipped layers not included: `sequence_speedup` charges it)."""
        per_index = self.index_costs(exit_layers, num_layers, policy)
        mean = sum(f * c for f, c in zip(fractions, per_index))
        return self.full_token(num_layers) / mean


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Positions per layer call timed for the catch-up cost (more are rare; extrapolated).
CATCH_UP_ROWS = 4


@torch.inference_mode()
def measure_costs(model: EarlyExitModel, *, context: int = 64, repeats: int = 30) -> Costs:
    """Median time of each piece over `repeats` calls, after a short warmup."""
    backbone = model.backbone
    device = backbone.tok_embeddings.weight.device
    vocab = backbone.tok_embeddings.num_embeddings
    gen = Generator(backbone, max_seq_len=context + CATCH_UP_ROWS)
    gen.prefill(torch.arange(context, device=device) % vocab)
    n = gen.num_layers
    layer_rows_s = []
    for rows in range(1, CATCH_UP_ROWS + 1):
        h_rows, span = gen.embed(torch.ones(1, rows, dtype=torch.long, device=device)), gen.span(context, rows)
        layer_rows_s.append(median_seconds(lambda h=h_rows, s=span: gen.run_layers(h, 0, n, s), repeats) / n)
    # More positions never cost less: a dip is timing noise, so each count costs at least the one before.
    layer_rows_s = list(itertools.accumulate(layer_rows_s, max))
    layer_s = layer_rows_s[0]
    h = gen.run_layers(gen.embed(torch.ones(1, 1, dtype=torch.long, device=device)), 0, n, gen.span(context, 1))[:, -1]

    def head(weight: torch.Tensor) -> Callable[[], object]:
        def run() -> object:
            logits = head_logits(h, weight).float()
            return (logits.amax(-1) - logits.logsumexp(-1)).exp()

        return run

    exit_s, estimator_s = {}, {}
    for layer in model.exit_layers:
        module = model.exit(layer)
        exit_s[layer] = median_seconds(lambda m=module: m(h[:, None]), repeats)
        if module.confidence is not None:
            estimator_s[layer] = median_seconds(lambda m=module: m.confidence(h), repeats)
    head_weights = {model.head_weight(layer).data_ptr(): model.head_weight(layer) for layer in model.exit_layers}
    head_s = (
        statistics.mean(median_seconds(head(w), repeats) for w in head_weights.values()) if head_weights else 0.0
    )
    final_s = median_seconds(lambda: gen.final_logits(h), repeats)
    # Any rows time alike: the first ones of an exit's head stand for the most frequent tokens'.
    frequent_s = 0.0
    if model.exit_layers:
        rows = model.head_weight(model.exit_layers[0])[: frequent_vocab(vocab)].contiguous()
        frequent_s = median_seconds(head(rows), repeats)
    return Costs(layer_s, head_s, final_s, exit_s, estimator_s, context, frequent_s, tuple(layer_rows_s))
