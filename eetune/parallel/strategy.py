"""The `Trainer` on a device mesh: the `Strategy` with data, model and state split.

Every rank draws the same global micro-batches (same seed, same order) and its data-parallel rank
takes its rows; the loss is divided by the micro-batch's global count of valid tokens, and FSDP sums
(not averages) gradients over data-parallel ranks, so each step equals the single-process step up
to floating-point summation order. Tensor-parallel ranks see the same rows and split the work;
pipeline stages each hold some layers and the exits on them (see `eetune.parallel.pipeline`).
Gradient clipping uses the global norm over all shards and stages. Rank 0 logs and writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from eetune.config.schema import EetuneConfig, to_typed
from eetune.errors import EetuneError
from eetune.eval.heldout import ExitQuality
from eetune.exits import EarlyExitModel, build_manifest
from eetune.exits.modules import lm_head_weight
from eetune.models import BaseModel, base_info
from eetune.parallel.checkpoint import gather_exit_state, load_mesh_state, save_mesh_state, write_exits
from eetune.parallel.load import StageModel
from eetune.parallel.mesh import Topology
from eetune.parallel.pipeline import BackboneStage, StagePipeline
from eetune.train.losses import VocabShard, exit_losses
from eetune.train.strategy import backbone_states
from eetune.train.trainer import local_shard


class Mesh:
    """This rank's part of a mesh run: `stage` is its pipeline stage of the backbone and exits."""

    is_main: bool

    def __init__(self, cfg: EetuneConfig, topology: Topology, stage: StageModel, seq_len: int,
                 heldout_shape: tuple[int, int]) -> None:
        self.cfg, self.topology, self.stage = cfg, topology, stage
        self.device = topology.device
        self.is_main = topology.is_main
        self.vocab_shard = vocab_shard(stage, topology)
        self.rows = cfg.data.batch_size // topology.dims.dp
        self.layers = [spec.layer for spec in stage.specs]
        self.stage_layers = list(stage.plan.exits)
        self.final_built = stage.plans[-1].computes_final
        self.train_pipeline = self.heldout_pipeline = None
        if topology.dims.pp > 1:
            module = BackboneStage(stage.model, stage.plan)
            shape = dict(dim=stage.base.hf_config["hidden_size"], dtype=stage.base.dtype)
            self.train_pipeline = StagePipeline(module, topology.pp_group, self.device, self.rows,
                                                cfg.parallel.pp_microbatch_size, seq_len=seq_len, **shape)
            self.heldout_pipeline = StagePipeline(module, topology.pp_group, self.device, heldout_shape[0], 1,
                                                  seq_len=heldout_shape[1] - 1, **shape)

    def describe(self) -> str:
        return f" on mesh {self.topology.dims.describe()}"

    # --- the step ----------------------------------------------------------------------------

    def local_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rows = slice(self.topology.dp_rank * self.rows, (self.topology.dp_rank + 1) * self.rows)
        return {key: batch[key][rows].to(self.device) for key in ("tokens", "labels")} | {"indices": None}

    def backbone_states(self, model: EarlyExitModel, tokens: torch.Tensor, layers: list[int], final: bool,
                        heldout: bool = False) -> dict[str, torch.Tensor]:
        """This stage's exit-layer outputs (keys "8", ...) and "final" when asked for."""
        pipeline = self.heldout_pipeline if heldout else self.train_pipeline
        if pipeline is None:  # one stage: the single-process backbone pass over the local rows
            return backbone_states(model, tokens, layers, final)
        final_shape = (*tokens.shape, self.stage.base.hf_config["hidden_size"]) if final else None
        return pipeline.forward(tokens, final_shape, self.stage.base.dtype)

    def reduce_sums(self, sums: torch.Tensor) -> torch.Tensor:
        on_device = sums.to(self.device)
        self.topology.sum_over_data(on_device)
        sums.copy_(on_device.cpu())
        return sums

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        return clip_grad_norm_(params, max_norm, self.topology)

    # --- held-out quality ----------------------------------------------------------------------

    @torch.no_grad()
    def heldout_quality(self, model: EarlyExitModel, sequences: torch.Tensor,
                        autocast: Callable[[], ContextManager]) -> dict[int, ExitQuality]:
        """Held-out CE per exit (and agreement with the final layer, and its CE, where it is built),
        from the same fused, vocabulary-parallel loss the step uses. Every rank scores all sequences."""
        base = self.stage.base
        inputs, targets = sequences[:, :-1], sequences[:, 1:]
        if self.heldout_pipeline is None:
            states = backbone_states(model, inputs, self.layers, self.final_built)
        else:
            states = self.backbone_states(model, inputs, self.layers, self.final_built, heldout=True)
        teacher = states.get("final")
        lm_head = local_shard(lm_head_weight(base.model))
        scored: dict[int, tuple[float, Optional[float]]] = {}
        with autocast():
            hiddens = {layer: model.exit_hidden(layer, states[str(layer)]) for layer in self.stage_layers}
        if self.stage.plan.computes_final:
            hiddens[model.num_layers] = teacher
        if hiddens:
            dtype = next(iter(hiddens.values())).dtype
            heads = {layer: (local_shard(model.head_weight(layer)) if layer in self.stage_layers else lm_head).to(dtype)
                     for layer in hiddens}
            out = exit_losses(
                hiddens, heads, targets, {layer: 1.0 for layer in hiddens},
                teacher_hidden=teacher.to(dtype) if teacher is not None else None,
                teacher_head_weight=lm_head.to(dtype) if teacher is not None else None,
                chunk_size=self.cfg.loss.chunk_size, vocab_shard=self.vocab_shard,
            )
            for layer, stats in out.exits.items():
                scored[layer] = (float(stats.ce), float(stats.agreement) if stats.agreement is not None else None)
        for module in model.exits.values():
            if isinstance(module, FSDPModule):
                module.reshard()  # kept gathered for the loss; nothing to backward here
        parts: list = [None] * self.topology.dims.pp
        if self.topology.dims.pp > 1:
            dist.all_gather_object(parts, scored, group=self.topology.pp_group)
        else:
            parts = [scored]
        merged = {layer: value for part in parts for layer, value in part.items()}
        return {layer: ExitQuality(layer, ce, agreement) for layer, (ce, agreement) in sorted(merged.items())}

    # --- state and results -------------------------------------------------------------------

    def save_state(self, run_dir: Path, model: EarlyExitModel, optimizer, payload: dict[str, Any]) -> None:
        save_mesh_state(run_dir, self.topology, model.exits, optimizer, payload)

    def load_state(self, run_dir: Path, model: EarlyExitModel, optimizer) -> dict[str, Any]:
        return load_mesh_state(run_dir, self.topology, model.exits, optimizer)

    def run_summary(self) -> dict[str, Any]:
        return {"mesh": self.topology.dims.as_dict(),
                "stages": [{"layers": [plan.first + 1, plan.last], "exits": list(plan.exits)}
                           for plan in self.stage.plans]}

    def write_exits(self, run_dir: Path, model: EarlyExitModel, base: BaseModel, summary: dict[str, Any]) -> None:
        tensors = gather_exit_state(model.exits, self.topology)
        if self.is_main:
            manifest = build_manifest(model, base_info(base), stage="tune", extra={"tune": summary})
            # The manifest describes the whole run, not this rank's stage.
            manifest["exits"] = [spec.to_dict() for spec in self.stage.specs]
            manifest["exit_parameters"] = sum(t.numel() for t in tensors.values())
            write_exits(run_dir, tensors, manifest)

    def barrier(self) -> None:
        dist.barrier()


def rank0_config(cfg: EetuneConfig) -> EetuneConfig:
    """Rank 0's resolved config for everyone: ranks that composed their own (Slurm: each runs
    `eetune tune ...`) may differ in time-stamped defaults such as run_dir."""
    text = [OmegaConf.to_yaml(cfg, resolve=True) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(text, src=0)
    return to_typed(OmegaConf.create(text[0]))


def on_rank0_first(action: Callable[[], Any]) -> None:
    """Run `action` on rank 0; its EetuneError (a user mistake) is raised on every rank."""
    message = [None]
    if dist.get_rank() == 0:
        try:
            action()
        except EetuneError as exc:
            message[0] = str(exc)
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise EetuneError(message[0])


def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float, topology: Topology) -> float:
    """Scale gradients so their global L2 norm, over every shard and pipeline stage, is <= max_norm.

    torch's clip_grad_norm_ cannot stack norms of DTensors on different meshes (FSDP-only and
    FSDP x TP parameters of one exit) nor see other stages; the formula is torch's.
    """
    squares = torch.zeros((), dtype=torch.float64, device=topology.device)
    grads = [p.grad for p in params if p.grad is not None]
    for grad in grads:
        if isinstance(grad, DTensor):
            # Sum this rank's squares over the mesh dims the tensor is split along (not replicated).
            local = torch.linalg.vector_norm(grad.to_local(), 2).double() ** 2
            for dim, placement in enumerate(grad.placements):
                if placement.is_shard():
                    dist.all_reduce(local, group=grad.device_mesh.get_group(dim))
            squares += local
        else:
            squares += torch.linalg.vector_norm(grad, 2).double() ** 2
    if topology.dims.pp > 1:
        dist.all_reduce(squares, group=topology.pp_group)
    total = squares.sqrt().float()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(coef.to(grad.device))
    return float(total)


def vocab_shard(stage: StageModel, topology: Topology) -> Optional[VocabShard]:
    """Where this rank's rows of the (vocabulary-parallel) heads start, when tp > 1."""
    if topology.dims.tp == 1:
        return None
    weight = lm_head_weight(stage.base.model)
    vocab, parts = weight.shape[0], topology.dims.tp
    per_rank = -(-vocab // parts)  # DTensor Shard(0) splits like torch.chunk
    start = min(topology.tp_rank * per_rank, vocab)
    return VocabShard(group=topology.tp_group, start=start, size=min(per_rank, vocab - start), vocab=vocab)
