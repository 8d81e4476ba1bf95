"""Pipeline parallel for decoding and evaluation: each stage holds and runs a contiguous run of layers.

Decoding goes one token (or one draft) at a time, so stages cannot overlap; pipeline parallel here
splits memory, not time (EE-LLM's inference at batch 1 does the same). What it must keep is that
every rank takes the same decisions with the same numbers:

- a stage computes its own layers (and writes their KV caches, the only ones it holds); other
  ranks pass the hidden state through unchanged, as a placeholder of the right shape;
- whenever the layer just run is the last of its stage, or the last a caller asked for (an exit
  layer, a draft's depth), the stage that computed it broadcasts its output over the pp group;
- embeddings, the final norm, the vocabulary heads and the exits are on every stage, so every rank
  computes the same logits from that hidden state, and the early-exit, draft, acceptance and
  sampling decisions need no further exchange (as with tensor parallel).

The backbone's `layer_pipeline` attribute carries this; `eetune.infer.generate.Generator` and
`EarlyExitModel.run_layers` consult it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from eetune.parallel.pipeline import StagePlan


class LayerPipeline:
    """Which stage computes each backbone layer, and the hand-off of hidden states between stages."""

    def __init__(self, plans: list[StagePlan], stage: int, group: dist.ProcessGroup) -> None:
        self.stage = stage
        self.group = group
        self.stage_of = [plan.stage for plan in plans for _ in plan.layer_indices]
        self._stage_ends = {plan.last - 1 for plan in plans}
        self._sources = [dist.get_global_rank(group, plan.stage) for plan in plans]

    def owns(self, index: int) -> bool:
        """Whether this rank computes layer `index` (0-based) and holds its weights and KV cache."""
        return self.stage_of[index] == self.stage

    def pass_on(self, h: torch.Tensor, index: int, end: int) -> torch.Tensor:
        """`h` after layer `index` of a run of layers ending before `end`: the same tensor on every
        rank when the next layer is another stage's or the run ends here; else as it is."""
        if index + 1 != end and index not in self._stage_ends:
            return h
        source = self.stage_of[index]
        if source == self.stage:
            h = h.contiguous()
            dist.broadcast(h, src=self._sources[source], group=self.group)
            return h
        # A fresh tensor: the placeholder may be a state a caller keeps (a skipped token's hidden state).
        received = torch.empty(h.shape, dtype=h.dtype, device=h.device)
        dist.broadcast(received, src=self._sources[source], group=self.group)
        return received
