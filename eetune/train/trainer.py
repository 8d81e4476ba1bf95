"""Stage two of EE-Tuning: train only the exits, backbone frozen, resumably.

Per step: the frozen backbone runs without autograd up to the deepest exit (or to the end
when a loss needs the final layer), or its states come from the hidden-state cache; each
exit maps its layer's output to a hidden state; one fused, chunked head + loss computes
every exit's loss without materialising [tokens, vocab] logits; AdamW steps the exits.

One loop for one process or a device mesh: what differs is asked of a `Strategy`
(`eetune.train.strategy`). Every process draws the same global micro-batches and takes its rows;
the loss is divided by the micro-batch's global count of valid tokens, so a mesh step equals the
single-process step up to floating-point summation order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.distributed.tensor import DTensor

from eetune.config.schema import EetuneConfig
from eetune.data import IGNORE_INDEX, TuningData
from eetune.data.batches import TrainBatches
from eetune.errors import EetuneError
from eetune.eval.heldout import ExitQuality
from eetune.exits import EarlyExitModel
from eetune.exits.modules import lm_head_weight
from eetune.infer.draft_vocab import count_tokens, save_token_counts
from eetune.models import BaseModel
from eetune.rundir import CONFIG_FILE, write_config
from eetune.train.hidden_cache import HiddenCache
from eetune.train.losses import ExitLossOutput, VocabShard, exit_losses, vocab_argmax
from eetune.train.metrics import LOSS_PLOT_FILE, MetricLogger, plot_loss_curves, read_metrics
from eetune.train.needs import RunNeeds, run_needs
from eetune.train.results import TuneResult, quality_from_metrics, quality_metrics, results_table, tune_summary
from eetune.train.schedule import FlatStop, exit_weight, lr_factor
from eetune.train.state import capture_rng, restore_rng
from eetune.train.strategy import SingleProcess, Strategy

# The hidden cache's key for the LM head's argmax over the final state.
TEACHER_TOP1 = "teacher_top1"
# Per exit, the sums a micro-batch contributes (divided by its global valid-token count after reduction).
STATS = ("ce", "max_prob", "kd", "agreement", "confidence_bce")


class NullLogger:
    """What processes other than the main one log to."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def log_summary(self, summary: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    def __init__(
        self, cfg: EetuneConfig, base: BaseModel, model: EarlyExitModel, data: TuningData, run_dir: Path,
        console: Console, strategy: Optional[Strategy] = None, needs: Optional[RunNeeds] = None,
    ) -> None:
        """`strategy`: default, this one process; `needs`: default, `run_needs(cfg)` (every exit of
        the run: a pipeline stage's `model` holds only some)."""
        self.cfg, self.base, self.model, self.data, self.run_dir, self.console = cfg, base, model, data, run_dir, console
        self.strategy = strategy or SingleProcess(base.model.tok_embeddings.weight.device)
        needs = needs or run_needs(cfg)
        self.specs = needs.specs
        self.layers = needs.layers
        self.local_layers = [layer for layer in self.layers if layer in model.exit_layers]  # this process's exits
        self.needs_final = needs.needs_final  # the final layer is computed only when a loss needs it
        self.bf16 = base.dtype == torch.bfloat16
        self.device = self.strategy.device
        weights = list(cfg.loss.exit_weights) or [1.0] * len(self.layers)
        if len(weights) != len(self.layers):
            raise EetuneError(
                f"loss.exit_weights has {len(weights)} values for {len(self.layers)} exits {self.layers}"
            )
        self.base_weights = dict(zip(self.layers, (float(w) for w in weights)))
        self.has_confidence = any(spec.confidence != "none" for spec in self.specs)

        self.batches = TrainBatches(
            data.train_tokens, data.train_labels, cfg.data.batch_size, shuffle=cfg.data.shuffle, seed=cfg.seed
        )
        self.heldout = data.heldout_batch(cfg.data.heldout_sequences)
        # Heads split over the vocabulary (tensor parallel) set this; None: each head is whole.
        self.vocab_shard: VocabShard | None = self.strategy.vocab_shard
        self.optimizer, self.scheduler = self._make_optimizer(model.exit_parameters())
        self.cache = self._open_cache() if cfg.data.cache_hidden else None
        self.step = 0
        self.tokens_seen = 0
        self.flat_stop = FlatStop(cfg.train.flat_patience, cfg.train.flat_min_delta)
        self.stopped_flat = False

    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        return lr_factor(
            step, total_steps=cfg.train.steps, warmup_steps=cfg.optim.warmup_steps,
            decay=cfg.optim.decay, min_ratio=cfg.optim.min_lr_ratio,
        )

    def _make_optimizer(self, params: list[torch.nn.Parameter]):
        # A pipeline stage without exits has nothing to train (EE-LLM crashed here on an empty optimizer).
        if not params:
            return None, None
        cfg = self.cfg
        optimizer = torch.optim.AdamW(
            params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay,
        )
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)

    def _open_cache(self) -> HiddenCache:
        keys = [str(layer) for layer in self.layers] + (["final"] if self.needs_final else [])
        storage = torch.bfloat16 if self.cfg.data.cache_dtype == "bfloat16" else self.base.dtype
        directory = Path(self.cfg.data.cache_dir) if self.cfg.data.cache_dir else self.run_dir / "hidden_cache"
        tokens = hashlib.sha256(self.data.train_tokens.numpy().tobytes())
        tokens.update(self.data.train_labels.numpy().tobytes())
        identity = {"base_fingerprint": self.base.fingerprint, "train_tokens_sha256": tokens.hexdigest()}
        return HiddenCache(
            directory, keys, self.data.num_examples, self.data.seq_len,
            lm_head_weight(self.base.model).shape[1], storage, index_keys=self._cached_indices(), identity=identity,
        )

    def _cached_indices(self) -> tuple[str, ...]:
        # The LM head's argmax over the frozen final state: one head pass per step saved.
        return (TEACHER_TOP1,) if self.cfg.loss.ce_target == "teacher" and self.needs_final else ()

    # --- the loop --------------------------------------------------------------------------

    def fit(self) -> TuneResult:
        cfg = self.cfg
        if cfg.resume:
            self._resume()
            self._continue_from_state()
        before = self._heldout_quality() if self.step == 0 else quality_from_metrics(self.run_dir)
        logger = MetricLogger(self.run_dir, cfg, resume_step=self.step) if self.strategy.is_main else NullLogger()
        self.strategy.barrier()  # a resumed run's metrics.jsonl is trimmed before anyone reads on
        if self.step == 0:
            logger.log(0, quality_metrics(before))
            self.flat_stop.update({layer: q.cross_entropy for layer, q in before.items() if layer in self.layers})
        progress = Progress(
            TextColumn("[bold]tune"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(), console=self.console, transient=False,
        )
        try:
            with progress:
                task = progress.add_task("tune", total=cfg.train.steps, completed=self.step, status="")
                while self.step < cfg.train.steps and not self.stopped_flat:
                    metrics = self.train_step()
                    self.step += 1
                    evaluated = bool(cfg.train.eval_every) and self.step % cfg.train.eval_every == 0
                    if evaluated:
                        quality = self._heldout_quality()
                        metrics.update(quality_metrics(quality))
                        self.stopped_flat = self.flat_stop.update(
                            {layer: q.cross_entropy for layer, q in quality.items() if layer in self.layers}
                        )
                    if evaluated or self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                        logger.log(self.step, metrics)
                    if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                        self._checkpoint()
                    progress.update(task, completed=self.step, status=self._status(metrics))
            if self.stopped_flat:
                self.console.print(
                    f"held-out exit CE flat for {cfg.train.flat_patience} evaluations: stopped at step {self.step}"
                )
            after = self._heldout_quality()
            logger.log(self.step, quality_metrics(after))
            logger.log_summary(quality_metrics(after))
        finally:
            logger.close()
        self._checkpoint()
        self._write_results(before, after)
        return TuneResult(self.run_dir, self.step, self.tokens_seen, before, after)

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        start = time.perf_counter()
        micro_batches = [next(self.batches) for _ in range(cfg.optim.grad_accum)]  # the same on every process
        counts = [float((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches]
        # The global count of loss tokens: accumulation then equals one big batch exactly.
        normalizer = sum(counts)
        weights = self._exit_weights()
        sums = torch.stack([
            self._micro_sums(self.strategy.local_batch(batch), weights, normalizer) for batch in micro_batches
        ])
        self.strategy.reduce_sums(sums)
        self.tokens_seen += sum(b["tokens"].numel() for b in micro_batches)
        totals = self._metrics_from_sums(sums, counts)
        if cfg.optim.grad_clip > 0:
            totals["grad_norm"] = self.strategy.clip_grad_norm(self.model.exit_parameters(), cfg.optim.grad_clip)
        # The lr this step used (what LambdaLR sets, also on a pipeline stage without an optimizer).
        totals["lr"] = (self.optimizer.param_groups[0]["lr"] if self.optimizer is not None
                        else cfg.optim.lr * self._lr_factor(self.step))
        if self.optimizer is not None:
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        totals["tokens_per_s"] = sum(b["tokens"].numel() for b in micro_batches) / elapsed
        totals.update({f"weight/exit_{layer}": w for layer, w in weights.items()})
        return totals

    def _exit_weights(self) -> dict[int, float]:
        """w_i of every exit at this step (warmed up, or constant)."""
        loss = self.cfg.loss
        return {
            layer: exit_weight(w, self.step, weighting=loss.weighting, warmup_steps=loss.warmup_steps)
            for layer, w in self.base_weights.items()
        }

    def _micro_sums(self, batch: dict[str, torch.Tensor], weights: dict[int, float], normalizer: float) -> torch.Tensor:
        """This process's sums for one micro-batch: [loss, then STATS per exit of the run]."""
        sums = torch.zeros(1 + len(STATS) * len(self.layers), dtype=torch.float64)
        states = self._backbone_states(batch)
        if not self.local_layers:
            return sums
        loss, out, confidence = self._exit_loss(self.local_layers, states, batch["labels"], weights, normalizer)
        loss.backward()
        sums[0] = float(loss.detach())
        for layer in self.local_layers:
            stats, count = out.exits[layer], out.num_valid
            offset = 1 + len(STATS) * self.layers.index(layer)
            values = (stats.ce * count, stats.max_prob * count,
                      stats.kd * count if stats.kd is not None else 0.0,
                      stats.agreement * count if stats.agreement is not None else 0.0,
                      confidence[layer].detach() * normalizer if layer in confidence else 0.0)
            sums[offset : offset + len(STATS)] = torch.tensor([float(v) for v in values], dtype=torch.float64)
        return sums

    def _metrics_from_sums(self, sums: torch.Tensor, counts: list[float]) -> dict[str, float]:
        """Per micro-batch means over its valid tokens, averaged over the micro-batches."""
        n = len(counts)

        def mean(layer: int, key: str) -> float:
            column = 1 + len(STATS) * self.layers.index(layer) + STATS.index(key)
            return sum(float(sums[i, column]) / max(counts[i], 1) for i in range(n)) / n

        metrics: dict[str, float] = {}
        for layer in [spec.layer for spec in self.specs if spec.confidence != "none"]:
            metrics[f"confidence_bce/exit_{layer}"] = mean(layer, "confidence_bce")
        metrics["loss"] = sum(float(sums[i, 0]) for i in range(n)) / n
        keys = ["ce", "max_prob"] + (["agreement", "kd"] if self.needs_final else [])
        for layer in self.layers:
            for key in keys:
                metrics[f"{key}/exit_{layer}"] = mean(layer, key)
        return metrics

    def _exit_loss(
        self, layers: list[int], states: dict[str, torch.Tensor], labels: torch.Tensor, weights: dict[int, float],
        normalizer: float,
    ) -> tuple[torch.Tensor, ExitLossOutput, dict[int, torch.Tensor]]:
        """The step loss of `layers`' exits on backbone `states`: (loss, fused output, confidence BCE per exit)."""
        cfg = self.cfg
        with self._autocast():
            hiddens = {layer: self.model.exit_hidden(layer, states[str(layer)]) for layer in layers}
        dtype = next(iter(hiddens.values())).dtype
        heads = {layer: local_shard(self.model.head_weight(layer)).to(dtype) for layer in layers}
        teacher = states.get("final")
        lm_head = local_shard(lm_head_weight(self.base.model)).to(dtype)
        targets = labels
        if cfg.loss.ce_target == "teacher":
            top1 = states.get(TEACHER_TOP1)
            if top1 is None:
                top1 = chunked_argmax(teacher, lm_head, cfg.loss.chunk_size, self.vocab_shard)
            targets = torch.where(labels == IGNORE_INDEX, labels, top1)
        out = exit_losses(
            hiddens, heads, targets, {layer: weights[layer] for layer in layers},
            token_weighting="dynamic" if cfg.loss.weighting == "dynamic" else "none",
            teacher_hidden=teacher, teacher_head_weight=lm_head if teacher is not None else None,
            kd_alpha=cfg.loss.kd_alpha, kd_temperature=cfg.loss.kd_temperature,
            normalizer=normalizer, chunk_size=cfg.loss.chunk_size, return_top1=self.has_confidence,
            vocab_shard=self.vocab_shard,
        )
        loss = out.loss
        confidence_losses: dict[int, torch.Tensor] = {}
        if self.has_confidence:
            valid = (labels != IGNORE_INDEX).float()
            for layer in layers:
                estimator = self.model.exit(layer).confidence
                if estimator is None:
                    continue
                # Detached input: the estimator learns to read the exit, not to reshape it.
                with self._autocast():
                    logit = estimator(hiddens[layer].detach()).float()
                agree = (out.exit_top1[layer] == out.teacher_top1).float()
                bce = F.binary_cross_entropy_with_logits(logit, agree, reduction="none")
                conf_loss = (bce * valid).sum() / normalizer
                loss = loss + cfg.loss.confidence_weight * conf_loss
                confidence_losses[layer] = conf_loss
        return loss, out, confidence_losses

    @torch.no_grad()
    def _backbone_states(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Layer outputs at every exit (keys "8", "16", ...) and "final" if needed; with the cache,
        also the LM head's argmax over "final" where the CE target is the teacher's."""
        dtype = self.base.dtype
        if self.cache is not None:
            cached = self.cache.get(batch["indices"])
            if cached is not None:
                return {key: value.to(self.device, dtype if value.is_floating_point() else value.dtype)
                        for key, value in cached.items()}
        states = self.strategy.backbone_states(self.model, batch["tokens"], self.layers, self.needs_final)
        if self.cache is not None:
            if self.cache.dtype != dtype:
                # Stored rounded: every epoch, this one included, sees the same values.
                states = {key: value.to(self.cache.dtype).to(dtype) for key, value in states.items()}
            if TEACHER_TOP1 in self.cache.index_keys:
                lm_head = local_shard(lm_head_weight(self.base.model)).to(states["final"].dtype)
                states[TEACHER_TOP1] = chunked_argmax(states["final"], lm_head, self.cfg.loss.chunk_size,
                                                      self.vocab_shard)
            self.cache.put(batch["indices"], states)
        return states

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _heldout_quality(self) -> dict[int, ExitQuality]:
        return self.strategy.heldout_quality(self.model, self.heldout.to(self.device), self._autocast)

    # --- state and results -------------------------------------------------------------------

    def _resume(self) -> None:
        state = self.strategy.load_state(self.run_dir, self.model, self.optimizer)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["data"])
        restore_rng(state["rng"])
        self.step = state["step"]
        self.tokens_seen = state["extra"].get("tokens_seen", 0)
        if "flat_stop" in state["extra"]:
            self.flat_stop.load_state_dict(state["extra"]["flat_stop"])
        self.console.print(f"resumed {self.run_dir} at step {self.step}{self.strategy.describe()}")

    def _continue_from_state(self) -> None:
        """After a restore, go on under the current config, whose train.steps a resume may change:
        the lr from here on is the schedule a run configured with the current train.steps has,
        evaluated from the current step; a flat-stopped run whose train.steps was raised gets
        another train.flat_patience evaluations."""
        if self.scheduler is not None:
            # The restored lr is the old schedule's; later steps already use _lr_factor.
            factor = self._lr_factor(self.step)
            for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base_lr * factor
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        # config.yaml is rewritten only with a checkpoint: it is the config of the saved state.
        extended = self.cfg.train.steps > OmegaConf.load(self.run_dir / CONFIG_FILE).train.steps
        if extended and self.flat_stop.fired():
            self.flat_stop.evals_without_gain = 0
        self.stopped_flat = self.flat_stop.fired()

    def _checkpoint(self) -> None:
        if self.cache is not None:
            self.cache.flush()
        self.strategy.save_state(self.run_dir, self.model, self.optimizer, {
            "step": self.step,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "data": self.batches.state_dict(),
            "rng": capture_rng(),
            "extra": {"tokens_seen": self.tokens_seen, "flat_stop": self.flat_stop.state_dict()},
        })
        if self.strategy.is_main and self.cfg.resume:
            # A resumed run's config.yaml takes the changes a resume may make (train.steps, ...),
            # written after the state it describes.
            write_config(self.run_dir, dataclasses.replace(self.cfg, resume=False))

    def _write_results(self, before: dict[int, ExitQuality], after: dict[int, ExitQuality]) -> None:
        summary = {**tune_summary(self.step, self.tokens_seen, self.stopped_flat, before, after), **self.strategy.run_summary()}
        self.strategy.write_exits(self.run_dir, self.model, self.base, summary)
        if self.strategy.is_main:
            # Token frequencies of the training targets: the kept vocabulary of FR-Spec drafting. The
            # vocabulary size from the config: a mesh rank may hold none or part of the embeddings.
            vocab_size = int(self.base.hf_config["vocab_size"])
            save_token_counts(self.run_dir, count_tokens(self.data.train_labels, vocab_size, IGNORE_INDEX))
            target = "the final layer's argmax" if self.cfg.loss.ce_target == "teacher" else "the data"
            plot_loss_curves(
                read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / LOSS_PLOT_FILE,
                title=f"{self.base.name}: exits {self.layers} (train CE vs {target})",
                final_layer=self.model.num_layers,
            )
            self.console.print(results_table(self.layers, self.model.num_layers, before, after))
            self.console.print(f"tuned exits written to [bold]{self.run_dir}[/] (loss curve: {LOSS_PLOT_FILE})")
        self.strategy.barrier()

    def _status(self, metrics: dict[str, float]) -> str:
        ces = " ".join(f"{layer}:{metrics[f'ce/exit_{layer}']:.2f}" for layer in self.layers)
        return f"CE {ces} | {metrics['tokens_per_s']:.0f} tok/s"


def chunked_argmax(
    hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int, vocab_shard: VocabShard | None = None
) -> torch.Tensor:
    """argmax(hidden @ weight.T) over the last dim, `chunk_size` rows at a time (over all ranks'
    vocabulary rows when `weight` is this rank's `vocab_shard`)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for start in range(0, flat.shape[0], chunk_size):
        out[start : start + chunk_size] = vocab_argmax(flat[start : start + chunk_size] @ weight.T, vocab_shard)
    return out.view(hidden.shape[:-1])


def local_shard(weight: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor-parallel (DTensor) weight; a plain tensor as it is."""
    return weight.to_local() if isinstance(weight, DTensor) else weight
