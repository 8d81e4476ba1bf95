"""The tuning loop on a device mesh: the single-process `Trainer`, with data, model and state split.

Every rank draws the same global micro-batches (same seed, same order) and its data-parallel rank
takes its rows; the loss is divided by the micro-batch's global count of valid tokens, and FSDP sums
(not averages) gradients over data-parallel ranks, so each step equals the single-process step up
to floating-point summation order. Tensor-parallel ranks see the same rows and split the work;
pipeline stages each hold some layers and the exits on them (see `eetune.parallel.pipeline`).
Gradient clipping uses the global norm over all shards and stages. Rank 0 logs and writes.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from eetune.console import make_console
from eetune.data import IGNORE_INDEX, TuningData, load_tuning_data
from eetune.errors import EetuneError
from eetune.eval.heldout import ExitQuality
from eetune.exits import build_manifest
from eetune.exits.modules import lm_head_weight
from eetune.parallel.checkpoint import gather_exit_state, load_mesh_state, save_mesh_state, write_exits
from eetune.parallel.launch import relaunch
from eetune.parallel.load import StageModel, build_stage_model, check_loaded, run_specs
from eetune.parallel.mesh import Topology, init_topology, under_launcher
from eetune.parallel.pipeline import BackboneStage, StagePipeline
from eetune.models import base_info
from eetune.train import loop
from eetune.train.loop import local_shard
from eetune.train.losses import VocabShard, exit_losses
from eetune.train.metrics import LOSS_PLOT_FILE, plot_loss_curves, read_metrics
from eetune.train.state import capture_rng, restore_rng

# Per exit, the sums a micro-batch contributes (divided by its global valid-token count after reduction).
_STATS = ("ce", "max_prob", "kd", "agreement", "confidence_bce")


def run(cfg: DictConfig, console: Optional[Console] = None) -> loop.TuneResult:
    console = console or make_console()
    if int(cfg.parallel.nproc_per_node) > 1 and not under_launcher():
        relaunch(cfg, console)
        return loop.result_from_run_dir(Path(cfg.run_dir))
    owns_group = not dist.is_initialized()
    topology = init_topology(cfg.parallel, cfg.model.device)
    try:
        cfg = _rank0_config(cfg)
        if not topology.is_main:
            console = Console(quiet=True)
        return _run(cfg, topology, console)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _run(cfg: DictConfig, topology: Topology, console: Console) -> loop.TuneResult:
    if cfg.data.cache_hidden:
        raise EetuneError("data.cache_hidden is single-process only: set data.cache_hidden=false for a mesh run")
    if cfg.model.dtype == "float16":
        raise EetuneError("tuning in float16 is not supported: use model.dtype=bfloat16 or float32")
    topology.dims.check_batch_size(int(cfg.data.batch_size))
    run_dir = Path(cfg.run_dir)
    _on_rank0_first(lambda: loop.check_run_dir(cfg, run_dir))
    specs = run_specs(cfg)
    # As Trainer.needs_final: the final layer is computed only when a loss needs it.
    needs_final = cfg.loss.kd_alpha > 0 or cfg.loss.ce_target == "teacher" or any(
        spec.confidence != "none" for spec in specs)
    console.print(f"mesh {topology.dims.describe()} on {topology.dims.world_size} processes ({topology.device.type})")
    torch.manual_seed(cfg.seed)  # before the exits are built, as in a single process
    stage = build_stage_model(cfg, topology, specs, needs_final, loop._build_model)
    check_loaded(stage)
    data = load_tuning_data(cfg.data, stage.base.tokenizer, max_seq_len=cfg.model.max_seq_len)
    trainer = MeshTrainer(cfg, stage, data, run_dir, console, topology)
    # Every start-up check has passed on every rank: only now does rank 0 make the run dir.
    with loop.started_run_dir(cfg, run_dir) if topology.is_main else contextlib.nullcontext():
        return trainer.fit()


def _rank0_config(cfg: DictConfig) -> DictConfig:
    """Rank 0's resolved config for everyone: ranks that composed their own (Slurm: each runs
    `eetune tune ...`) may differ in time-stamped defaults such as run_dir."""
    text = [OmegaConf.to_yaml(cfg, resolve=True) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(text, src=0)
    return OmegaConf.create(text[0])


def _on_rank0_first(action) -> None:
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


class _NoLogger:
    """What ranks other than 0 log to."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def log_summary(self, summary: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class MeshTrainer(loop.Trainer):
    def __init__(self, cfg: DictConfig, stage: StageModel, data: TuningData, run_dir: Path, console: Console,
                 topology: Topology) -> None:
        self.topology, self.stage = topology, stage
        super().__init__(cfg, stage.base, stage.model, data, run_dir, console, specs=stage.specs)
        self.device = topology.device
        self.stage_layers = list(stage.plan.exits)
        self.final_built = stage.plans[-1].computes_final
        self.vocab_shard = _vocab_shard(stage, topology)
        self.rows = cfg.data.batch_size // topology.dims.dp
        self.train_pipeline = self.heldout_pipeline = None
        if topology.dims.pp > 1:
            module = BackboneStage(self.model, stage.plan)
            shape = dict(dim=stage.base.hf_config["hidden_size"], dtype=stage.base.dtype)
            self.train_pipeline = StagePipeline(module, topology.pp_group, self.device, self.rows,
                                                cfg.parallel.pp_microbatch_size, seq_len=data.seq_len, **shape)
            self.heldout_pipeline = StagePipeline(module, topology.pp_group, self.device, len(self.heldout), 1,
                                                  seq_len=self.heldout.shape[1] - 1, **shape)

    # --- the step ----------------------------------------------------------------------------

    def _make_optimizer(self, params):
        # A pipeline stage without exits has nothing to train (EE-LLM crashed here on an empty optimizer).
        return super()._make_optimizer(params) if params else (None, None)

    def train_step(self) -> dict[str, float]:
        cfg, topo = self.cfg, self.topology
        start = time.perf_counter()
        micro_batches = [next(self.batches) for _ in range(cfg.optim.grad_accum)]  # the same on every rank
        counts = [float((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches]
        normalizer = sum(counts)  # the global count of loss tokens, as in a single process
        weights = self._exit_weights()
        rows = slice(topo.dp_rank * self.rows, (topo.dp_rank + 1) * self.rows)
        sums = torch.stack([
            self._mesh_micro_step(
                {key: batch[key][rows].to(self.device) for key in ("tokens", "labels")}, weights, normalizer
            )
            for batch in micro_batches
        ])
        topo.sum_over_data(sums)
        self.tokens_seen += sum(b["tokens"].numel() for b in micro_batches)
        totals = self._metrics_from_sums(sums, counts, normalizer)
        if cfg.optim.grad_clip > 0:
            totals["grad_norm"] = clip_grad_norm_(self.model.exit_parameters(), cfg.optim.grad_clip, topo)
        totals["lr"] = cfg.optim.lr * self._lr_factor(self.step)  # what LambdaLR sets, on every stage
        return self._finish_step(totals, micro_batches, weights, start)

    def _mesh_micro_step(self, batch: dict[str, torch.Tensor], weights: dict[int, float], normalizer: float) -> torch.Tensor:
        """This rank's sums for one micro-batch: [loss, then _STATS per exit of the run]."""
        sums = torch.zeros(1 + len(_STATS) * len(self.layers), dtype=torch.float64, device=self.device)
        states = self._stage_states(batch["tokens"], self.train_pipeline)
        if not self.stage_layers:
            return sums
        loss, out, confidence = self._exit_loss(self.stage_layers, states, batch["labels"], weights, normalizer)
        loss.backward()
        sums[0] = float(loss.detach())
        for layer in self.stage_layers:
            stats, count = out.exits[layer], out.num_valid
            offset = 1 + len(_STATS) * self.layers.index(layer)
            values = (stats.ce * count, stats.max_prob * count,
                      stats.kd * count if stats.kd is not None else 0.0,
                      stats.agreement * count if stats.agreement is not None else 0.0,
                      confidence[layer].detach() * normalizer if layer in confidence else 0.0)
            sums[offset : offset + len(_STATS)] = torch.tensor([float(v) for v in values], dtype=torch.float64,
                                                               device=self.device)
        return sums

    def _metrics_from_sums(self, sums: torch.Tensor, counts: list[float], normalizer: float) -> dict[str, float]:
        """The single-process metrics: per micro-batch means over its valid tokens, averaged over micro-batches."""
        n = len(counts)
        metrics: dict[str, float] = {}
        confidence_layers = [spec.layer for spec in self.stage.specs if spec.confidence != "none"]
        for layer in confidence_layers:
            column = 1 + len(_STATS) * self.layers.index(layer) + _STATS.index("confidence_bce")
            metrics[f"confidence_bce/exit_{layer}"] = sum(
                float(sums[i, column]) / max(counts[i], 1) for i in range(n)) / n
        metrics["loss"] = sum(float(sums[i, 0]) for i in range(n)) / n
        keys = ["ce", "max_prob"] + (["agreement", "kd"] if self.needs_final else [])
        for layer in self.layers:
            for key in keys:
                column = 1 + len(_STATS) * self.layers.index(layer) + _STATS.index(key)
                metrics[f"{key}/exit_{layer}"] = sum(float(sums[i, column]) / max(counts[i], 1) for i in range(n)) / n
        return metrics

    def _stage_states(self, tokens: torch.Tensor, pipeline: Optional[StagePipeline]) -> dict[str, torch.Tensor]:
        """This stage's exit-layer outputs (keys "8", ...) and "final" when the run computes it."""
        if pipeline is None:  # one stage: the single-process backbone pass over the local rows
            return self._backbone_states({"tokens": tokens, "indices": None})
        final_shape = (*tokens.shape, self.base.hf_config["hidden_size"]) if self.needs_final else None
        return pipeline.forward(tokens, final_shape, self.base.dtype)

    # --- held-out quality ----------------------------------------------------------------------

    @torch.no_grad()
    def _heldout_quality(self) -> dict[int, ExitQuality]:
        """Held-out CE per exit (and agreement with the final layer, and its CE, where it is built),
        from the same fused, vocabulary-parallel loss the step uses. Every rank scores all sequences."""
        sequences = self.heldout.to(self.device)
        inputs, targets = sequences[:, :-1], sequences[:, 1:]
        if self.heldout_pipeline is None:
            depths = self.layers + ([self.model.num_layers] if self.final_built else [])
            hidden = self.model.hidden_states(inputs, depths)
            states = {str(layer): hidden[layer] for layer in self.layers}
            if self.final_built:
                states["final"] = self.base.model.norm(hidden[self.model.num_layers])
        else:
            shape = (*inputs.shape, self.base.hf_config["hidden_size"]) if self.final_built else None
            states = self.heldout_pipeline.forward(inputs, shape, self.base.dtype)
        teacher = states.get("final")
        lm_head = local_shard(lm_head_weight(self.base.model))
        scored: dict[int, tuple[float, Optional[float]]] = {}
        with self._autocast():
            hiddens = {layer: self.model.exit_hidden(layer, states[str(layer)]) for layer in self.stage_layers}
        if self.stage.plan.computes_final:
            hiddens[self.model.num_layers] = teacher
        if hiddens:
            dtype = next(iter(hiddens.values())).dtype
            heads = {layer: (local_shard(self.model.head_weight(layer)) if layer in self.stage_layers else lm_head).to(dtype)
                     for layer in hiddens}
            out = exit_losses(
                hiddens, heads, targets, {layer: 1.0 for layer in hiddens},
                teacher_hidden=teacher.to(dtype) if teacher is not None else None,
                teacher_head_weight=lm_head.to(dtype) if teacher is not None else None,
                chunk_size=self.cfg.loss.chunk_size, vocab_shard=self.vocab_shard,
            )
            for layer, stats in out.exits.items():
                scored[layer] = (float(stats.ce), float(stats.agreement) if stats.agreement is not None else None)
        for module in self.model.exits.values():
            if isinstance(module, FSDPModule):
                module.reshard()  # kept gathered for the loss; nothing to backward here
        parts: list = [None] * self.topology.dims.pp
        if self.topology.dims.pp > 1:
            dist.all_gather_object(parts, scored, group=self.topology.pp_group)
        else:
            parts = [scored]
        merged = {layer: value for part in parts for layer, value in part.items()}
        return {layer: ExitQuality(layer, ce, agreement) for layer, (ce, agreement) in sorted(merged.items())}

    # --- logging, state, results -------------------------------------------------------------

    def _metric_logger(self):
        logger = super()._metric_logger() if self.topology.is_main else _NoLogger()
        dist.barrier()  # a resumed run's metrics.jsonl is trimmed before anyone reads on
        return logger

    def _checkpoint(self) -> None:
        save_mesh_state(
            self.run_dir, self.topology, self.model.exits, self.optimizer,
            {
                "step": self.step,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "data": self.batches.state_dict(),
                "rng": capture_rng(),
                "extra": {"tokens_seen": self.tokens_seen, "flat_stop": self.flat_stop.state_dict()},
            },
        )
        if self.topology.is_main:
            self._record_config()

    def _resume(self) -> None:
        state = load_mesh_state(self.run_dir, self.topology, self.model.exits, self.optimizer)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["data"])
        restore_rng(state["rng"])
        self.step = state["step"]
        self.tokens_seen = state["extra"]["tokens_seen"]
        self.flat_stop.load_state_dict(state["extra"]["flat_stop"])
        self.console.print(f"resumed {self.run_dir} at step {self.step} on mesh {self.topology.dims.describe()}")

    def _write_results(self, before: dict[int, ExitQuality], after: dict[int, ExitQuality]) -> None:
        tensors = gather_exit_state(self.model.exits, self.topology)
        if self.topology.is_main:
            summary = {
                **self._tune_summary(before, after),
                "mesh": self.topology.dims.as_dict(),
                "stages": [{"layers": [plan.first + 1, plan.last], "exits": list(plan.exits)}
                           for plan in self.stage.plans],
            }
            manifest = build_manifest(self.model, base_info(self.base), stage="tune", extra={"tune": summary})
            # The manifest describes the whole run, not this rank's stage.
            manifest["exits"] = [spec.to_dict() for spec in self.stage.specs]
            manifest["exit_parameters"] = sum(t.numel() for t in tensors.values())
            write_exits(self.run_dir, tensors, manifest)
            self._save_token_counts()
            plot_loss_curves(
                read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / LOSS_PLOT_FILE,
                title=f"{self.base.name}: exits {self.layers} (train CE vs {self._ce_target_name()})",
                final_layer=self.model.num_layers,
            )
            self.console.print(loop._results_table(self.layers, self.model.num_layers, before, after))
            self.console.print(f"tuned exits written to [bold]{self.run_dir}[/] (loss curve: {LOSS_PLOT_FILE})")
        dist.barrier()


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


def _vocab_shard(stage: StageModel, topology: Topology) -> Optional[VocabShard]:
    """Where this rank's rows of the (vocabulary-parallel) heads start, when tp > 1."""
    if topology.dims.tp == 1:
        return None
    weight = lm_head_weight(stage.base.model)
    vocab, parts = weight.shape[0], topology.dims.tp
    per_rank = -(-vocab // parts)  # DTensor Shard(0) splits like torch.chunk
    start = min(topology.tp_rank * per_rank, vocab)
    return VocabShard(group=topology.tp_group, start=start, size=min(per_rank, vocab - start), vocab=vocab)
