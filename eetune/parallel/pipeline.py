"""Pipeline parallel over a frozen backbone: which layers and exits each stage holds, and the forward pass.

The layers a run needs, 1..depth (depth = the deepest exit, or the last layer when a loss or the
held-out report needs the final layer), are split into `pp` contiguous, near-equal stages; each
exit lives on the stage that computes its layer; nothing past `depth` is built or loaded anywhere
(EE-LLM's "partial pipeline"). A stage may hold no exit: it only forwards activations.

Because the backbone is frozen, no gradient crosses a stage boundary: activations flow forward
through `torch.distributed.pipelining` (a `PipelineStage` per rank and a GPipe schedule run
forward-only with `eval()`, which chunks the rows into micro-batches so stages overlap), each stage
records the outputs of its exit layers while it forwards, and then computes and steps its own
exits' losses locally. The library fits exactly this forward-only hand-off; its backward machinery
(loss on the last stage, gradients sent back) is what a frozen backbone does not need. The final
layer's normalised state, which KD/teacher losses and agreement need on every stage, is broadcast
back from the last stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

from eetune.errors import EetuneError
from eetune.exits import EarlyExitModel
from eetune.train.needs import RunNeeds

FINAL = "final"


@dataclass(frozen=True)
class StagePlan:
    """Stage `stage` runs backbone layers first+1..last (1-based outputs) and holds `exits`."""

    stage: int
    num_stages: int
    first: int
    last: int
    exits: tuple[int, ...]
    computes_final: bool  # the last stage, when the run needs the final layer

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def layer_indices(self) -> range:
        """0-based indices into `decoder.layers`."""
        return range(self.first, self.last)


def run_stages(num_stages: int, num_layers: int, needs: RunNeeds, partial: bool) -> list[StagePlan]:
    """A run's stages: its layers up to the final one when a loss needs it or `parallel.partial` is off,
    else only up to the deepest exit (tune's mesh and `plan` alike)."""
    final = needs.needs_final or not partial
    depth = num_layers if final else max(needs.layers)
    return plan_stages(num_stages, depth, needs.layers, final)


def plan_stages(num_stages: int, depth: int, exit_layers: list[int], needs_final: bool) -> list[StagePlan]:
    """Split layers 1..depth into `num_stages` contiguous stages, the first ones one layer longer."""
    if depth < num_stages:
        raise EetuneError(
            f"parallel.pp={num_stages} stages need at least {num_stages} layers to split, but the run only "
            f"computes {depth} (up to its deepest exit): use fewer pipeline stages"
        )
    base, extra = divmod(depth, num_stages)
    plans, first = [], 0
    for stage in range(num_stages):
        last = first + base + (1 if stage < extra else 0)
        exits = tuple(layer for layer in sorted(exit_layers) if first < layer <= last)
        plans.append(StagePlan(stage, num_stages, first, last, exits, needs_final and stage == num_stages - 1))
        first = last
    return plans


class BackboneStage(nn.Module):
    """One stage's slice of the frozen backbone as a module: tokens or activations in, activations out.

    While forwarding, it records the outputs of its exit layers (and the final normalised state on a
    last stage that computes it) in `taps`, one dict per micro-batch, for the exits to read.
    """

    def __init__(self, model: EarlyExitModel, plan: StagePlan) -> None:
        super().__init__()
        self.model = model
        self.plan = plan
        self.taps: list[dict[str, torch.Tensor]] = []

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        h = self.model.embed(x) if plan.is_first else x
        taps: dict[str, torch.Tensor] = {}
        done = plan.first
        for layer in plan.exits:
            h = self.model.run_layers(h, done, layer)
            taps[str(layer)] = h
            done = layer
        h = self.model.run_layers(h, done, plan.last)
        if plan.computes_final:
            taps[FINAL] = self.model.backbone.norm(h)
        self.taps.append(taps)
        return h


class StagePipeline:
    """Forward-only pipeline of `BackboneStage`s for batches of one fixed shape."""

    def __init__(self, stage_module: BackboneStage, group: dist.ProcessGroup, device: torch.device,
                 rows: int, microbatch_rows: int, seq_len: int, dim: int, dtype: torch.dtype) -> None:
        if rows % microbatch_rows:
            raise EetuneError(
                f"parallel.pp_microbatch_size={microbatch_rows} must divide the {rows} sequences each "
                "pipeline pass holds per data-parallel rank"
            )
        self.module = stage_module
        self.plan = stage_module.plan
        self.group = group
        # Static shapes: [rows, seq] token ids into the first stage, [rows, seq, dim] activations
        # between stages; given up front, the library runs no extra forward to infer them.
        hidden = torch.empty(microbatch_rows, seq_len, dim, dtype=dtype, device=device)
        inputs = torch.empty(microbatch_rows, seq_len, dtype=torch.long, device=device) if self.plan.is_first else hidden
        stage = PipelineStage(stage_module, self.plan.stage, self.plan.num_stages, device, group=group,
                              input_args=inputs, output_args=hidden)
        self.schedule = ScheduleGPipe(stage, n_microbatches=rows // microbatch_rows)

    def forward(self, tokens: torch.Tensor, final_shape: Optional[tuple[int, ...]],
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Run the rows through every stage; this stage's exit-layer outputs (and "final" if any).

        `tokens` are read on the first stage only. With `final_shape`, the last stage's final
        normalised state is broadcast so that every stage gets "final".
        """
        self.module.taps.clear()
        if self.plan.is_first:
            self.schedule.eval(tokens, return_outputs=False)
        else:
            self.schedule.eval(return_outputs=False)
        taps = self.module.taps
        states = {key: torch.cat([tap[key] for tap in taps]) for key in (taps[0] if taps else {})}
        self.module.taps.clear()
        if final_shape is not None:
            final = states.get(FINAL)
            if final is None:
                final = torch.empty(final_shape, dtype=dtype, device=tokens.device)
            dist.broadcast(final, group=self.group, group_src=self.plan.num_stages - 1)
            states[FINAL] = final
        return states
