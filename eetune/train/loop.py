"""Stage two of EE-Tuning: train only the exits, backbone frozen, resumably.

Per step: the frozen backbone runs without autograd up to the deepest exit (or to the end
when a loss needs the final layer), or its states come from the hidden-state cache; each
exit maps its layer's output to a hidden state; one fused, chunked head + loss computes
every exit's loss without materialising [tokens, vocab] logits; AdamW steps the exits.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch.distributed.tensor import DTensor

from eetune.console import make_console
from eetune.config.schema import EetuneConfig
from eetune.data import IGNORE_INDEX, TuningData, load_tuning_data
from eetune.data.batches import TrainBatches
from eetune.errors import EetuneError
from eetune.eval.heldout import ExitQuality, heldout_quality
from eetune.exits import EarlyExitModel, ExitSpec, build_manifest, check_specs, load_exits, save_exits, specs_from_config
from eetune.exits.checkpoint import MANIFEST_FILE
from eetune.exits.modules import lm_head_weight
from eetune.infer.draft_vocab import count_tokens, save_token_counts
from eetune.models import BaseModel
from eetune.rundir import CONFIG_FILE, write_config
from eetune.models import base_info, load_base
from eetune.train.hidden_cache import HiddenCache
from eetune.train.losses import ExitLossOutput, VocabShard, exit_losses, vocab_argmax
from eetune.train.metrics import LOSS_PLOT_FILE, MetricLogger, plot_loss_curves, read_metrics
from eetune.train.schedule import FlatStop, exit_weight, lr_factor
from eetune.train.state import TrainerState, capture_rng, has_state, load_state, restore_rng, save_state, saved_step

# Keys that may differ between a run and its resumption (sections tuning never reads included,
# so runs saved before a section existed or changed its defaults still resume).
_RESUME_FREE_KEYS = ("resume", "stage", "run_dir", "logger", "generate", "serve", "eval", "export", "plan")
# Launch settings (how the processes were started, not what they compute), and how long the run
# goes and how often it logs, evaluates and saves: a resume may extend a run or change its cadence.
_RESUME_FREE_DOTTED = (
    "parallel.nproc_per_node", "parallel.backend",
    "train.steps", "train.flat_patience", "train.eval_every", "train.log_every", "train.checkpoint_every",
)


@dataclass
class TuneResult:
    run_dir: Path
    steps: int
    tokens_seen: int
    before: dict[int, ExitQuality]  # held-out quality at the start (key num_layers: final layer)
    after: dict[int, ExitQuality]


def run(cfg: DictConfig, console: Console | None = None) -> TuneResult:
    console = console or make_console()
    check_tune_config(cfg)
    run_dir = Path(cfg.run_dir)
    check_run_dir(cfg, run_dir)
    finished = finished_run(cfg, run_dir)
    if finished is not None:
        console.print(
            f"{run_dir} already finished at step {finished.steps}: nothing to do, nothing changed "
            "(resume with a larger train.steps to extend it)"
        )
        return finished
    from eetune.parallel import on_mesh

    if on_mesh(cfg):
        from eetune.parallel.trainer import run as run_on_mesh

        return run_on_mesh(cfg, console)
    # Every start-up check (base model, data, init_from, exits) comes before the run dir is made.
    base = load_base(cfg.model)
    if base.dtype == torch.float16:
        raise EetuneError("tuning in float16 is not supported: use model.dtype=bfloat16 or float32")
    data = load_tuning_data(cfg.data, base.tokenizer, max_seq_len=cfg.model.max_seq_len)
    torch.manual_seed(cfg.seed)
    model = _build_model(cfg, base)
    with started_run_dir(cfg, run_dir):
        return Trainer(cfg, base, model, data, run_dir, console).fit()


def check_tune_config(cfg: DictConfig) -> None:
    """Value checks the schema cannot express, made before anything is written."""
    loss, train = cfg.loss, cfg.train
    if not 0.0 <= loss.kd_alpha <= 1.0:
        raise EetuneError(f"loss.kd_alpha={loss.kd_alpha} must be in [0, 1]")
    if loss.kd_temperature <= 0:
        raise EetuneError(f"loss.kd_temperature={loss.kd_temperature} must be > 0")
    for key in ("train.steps", "optim.grad_accum", "data.batch_size", "loss.chunk_size"):
        if OmegaConf.select(cfg, key) < 1:
            raise EetuneError(f"{key}={OmegaConf.select(cfg, key)} must be >= 1")
    if train.flat_patience < 0 or train.flat_min_delta < 0:
        raise EetuneError("train.flat_patience and train.flat_min_delta must be >= 0")
    if train.flat_patience > 0 and train.eval_every < 1:
        raise EetuneError("train.flat_patience needs held-out evaluations to watch: set train.eval_every to a step count")


def check_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """A new run needs an absent or empty run dir; a resumed one, a tune run with a compatible config.
    Only reads: nothing is written until every start-up check has passed."""
    if cfg.resume:
        saved = run_dir / CONFIG_FILE
        if not saved.is_file() or not has_state(run_dir):
            raise EetuneError(f"resume=true but {run_dir} holds no interrupted tune run (config.yaml + state/)")
        _check_same_config(OmegaConf.load(saved), cfg, run_dir)
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        raise EetuneError(
            f"run dir {run_dir} already exists and is not empty: choose another run_dir=..., "
            "or pass resume=true to continue an interrupted run there"
        )


@contextlib.contextmanager
def started_run_dir(cfg: DictConfig, run_dir: Path) -> Iterator[None]:
    """Create a new run's dir and config.yaml (a resumed run's exist); if the start is refused
    (EetuneError) before any state is saved, remove what was created, so the corrected command
    can use the same run_dir."""
    if cfg.resume:
        yield
        return
    existed = run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, cfg)
    try:
        yield
    except EetuneError:
        if not has_state(run_dir):
            for path in [run_dir] if not existed else list(run_dir.iterdir()):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise


def finished_run(cfg: DictConfig, run_dir: Path) -> TuneResult | None:
    """resume=true on a run whose results are written at its saved step and which the config does
    not extend (train.steps not above the saved value): its result, read back; else None."""
    if not cfg.resume or not (run_dir / MANIFEST_FILE).is_file():
        return None
    tune = json.loads((run_dir / MANIFEST_FILE).read_text()).get("tune")
    if tune is None or tune["steps"] != saved_step(run_dir):
        return None  # the state went past the results: an extension was interrupted
    if cfg.train.steps > OmegaConf.load(run_dir / CONFIG_FILE).train.steps:
        return None
    return result_from_run_dir(run_dir)


def result_from_run_dir(run_dir: Path) -> TuneResult:
    """A finished tune's result, read back from its manifest."""
    manifest = json.loads((Path(run_dir) / MANIFEST_FILE).read_text())
    tune = manifest["tune"]

    def quality(when: str) -> dict[int, ExitQuality]:
        return {
            int(layer): ExitQuality(int(layer), values[f"cross_entropy_{when}"], values[f"agreement_{when}"])
            for layer, values in tune["heldout"].items()
        }

    return TuneResult(Path(run_dir), tune["steps"], tune["tokens_seen"], quality("before"), quality("after"))


def _check_same_config(saved: DictConfig, current: DictConfig, run_dir: Path) -> None:
    def comparable(c: DictConfig) -> dict:
        # A run saved before a schema field existed had that field at its default.
        with contextlib.suppress(OmegaConfBaseException):  # a key since removed: compare as saved
            c = OmegaConf.merge(OmegaConf.structured(EetuneConfig), c)
        container = OmegaConf.to_container(c, resolve=True)
        return {k: v for k, v in container.items() if k not in _RESUME_FREE_KEYS}

    old, new = _flatten(comparable(saved)), _flatten(comparable(current))
    for key in _RESUME_FREE_DOTTED:
        old.pop(key, None)
        new.pop(key, None)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        differences = ", ".join(f"{key} was {old.get(key)!r}, now {new.get(key)!r}" for key in changed)
        raise EetuneError(
            f"cannot resume {run_dir}: its config differs ({differences}); only train.steps, train.flat_patience, "
            "train.eval_every, train.log_every, train.checkpoint_every and logger may change on resume: "
            "resume with the original settings or start a new run_dir"
        )


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def _build_model(cfg: DictConfig, base: BaseModel) -> EarlyExitModel:
    if cfg.train.init_from:
        model = load_exits(cfg.train.init_from, base.model, base.fingerprint, base.checkpoint_dir)
    else:
        specs = specs_from_config(cfg.exits)
        check_specs(specs, base.num_layers)
        model = EarlyExitModel(base.model, specs, init_std=cfg.exits.init_std)
    # fp32 master weights for the optimizer; bf16 compute comes from autocast.
    model.exits.float()
    return model


class Trainer:
    def __init__(
        self, cfg: DictConfig, base: BaseModel, model: EarlyExitModel, data: TuningData, run_dir: Path,
        console: Console, specs: list[ExitSpec] | None = None,
    ) -> None:
        """`specs`: every exit of the run (default: the model's; a pipeline stage holds only some)."""
        self.cfg, self.base, self.model, self.data, self.run_dir, self.console = cfg, base, model, data, run_dir, console
        specs = model.specs if specs is None else specs
        self.layers = [spec.layer for spec in specs]
        self.bf16 = base.dtype == torch.bfloat16
        self.device = base.model.tok_embeddings.weight.device
        weights = list(cfg.loss.exit_weights) or [1.0] * len(self.layers)
        if len(weights) != len(self.layers):
            raise EetuneError(
                f"loss.exit_weights has {len(weights)} values for {len(self.layers)} exits {self.layers}"
            )
        self.base_weights = dict(zip(self.layers, (float(w) for w in weights)))
        self.has_confidence = any(spec.confidence != "none" for spec in specs)
        # The final layer is computed only when a loss needs it.
        self.needs_final = cfg.loss.kd_alpha > 0 or cfg.loss.ce_target == "teacher" or self.has_confidence

        self.batches = TrainBatches(
            data.train_tokens, data.train_labels, cfg.data.batch_size, shuffle=cfg.data.shuffle, seed=cfg.seed
        )
        self.heldout = data.heldout_batch(cfg.data.heldout_sequences)
        # Heads split over the vocabulary (tensor parallel) set this; None: each head is whole.
        self.vocab_shard: VocabShard | None = None
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
        cfg = self.cfg
        optimizer = torch.optim.AdamW(
            params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay,
        )
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)

    def _open_cache(self) -> HiddenCache:
        keys = [str(layer) for layer in self.layers] + (["final"] if self.needs_final else [])
        return HiddenCache(
            self.run_dir / "hidden_cache", keys, self.data.num_examples, self.data.seq_len,
            lm_head_weight(self.base.model).shape[1], self.base.dtype,
        )

    # --- the loop --------------------------------------------------------------------------

    def fit(self) -> TuneResult:
        cfg = self.cfg
        if cfg.resume:
            self._resume()
            self._continue_from_state()
        before = self._heldout_quality() if self.step == 0 else self._quality_from_metrics()
        logger = self._metric_logger()
        if self.step == 0:
            logger.log(0, self._quality_metrics(before))
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
                        metrics.update(self._quality_metrics(quality))
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
            logger.log(self.step, self._quality_metrics(after))
            logger.log_summary(self._quality_metrics(after))
        finally:
            logger.close()
        self._checkpoint()
        self._write_results(before, after)
        return TuneResult(self.run_dir, self.step, self.tokens_seen, before, after)

    def _resume(self) -> None:
        from eetune.parallel.checkpoint import refuse_mesh_state

        refuse_mesh_state(self.run_dir)
        self._restore(load_state(self.run_dir))

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

    def _record_config(self) -> None:
        """A resumed run's config.yaml takes the changes a resume may make (train.steps, ...),
        written after the state it describes."""
        if self.cfg.resume:
            write_config(self.run_dir, OmegaConf.merge(self.cfg, {"resume": False}))

    def _metric_logger(self) -> MetricLogger:
        return MetricLogger(self.run_dir, self.cfg, resume_step=self.step)

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        start = time.perf_counter()
        micro_batches = [
            {key: value.to(self.device) if key != "indices" else value for key, value in next(self.batches).items()}
            for _ in range(cfg.optim.grad_accum)
        ]
        # The global count of loss tokens: accumulation then equals one big batch exactly.
        normalizer = float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches))
        weights = self._exit_weights()
        totals: dict[str, float] = {}
        for batch in micro_batches:
            for key, value in self._micro_step(batch, weights, normalizer).items():
                totals[key] = totals.get(key, 0.0) + value / len(micro_batches)
            self.tokens_seen += batch["tokens"].numel()
        if cfg.optim.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.exit_parameters(), cfg.optim.grad_clip)
            totals["grad_norm"] = float(norm)
        totals["lr"] = self.optimizer.param_groups[0]["lr"]  # the lr this step used
        return self._finish_step(totals, micro_batches, weights, start)

    def _exit_weights(self) -> dict[int, float]:
        """w_i of every exit at this step (warmed up, or constant)."""
        loss = self.cfg.loss
        return {
            layer: exit_weight(w, self.step, weighting=loss.weighting, warmup_steps=loss.warmup_steps)
            for layer, w in self.base_weights.items()
        }

    def _finish_step(
        self, totals: dict[str, float], micro_batches: list[dict], weights: dict[int, float], start: float
    ) -> dict[str, float]:
        """Step the optimizer (if this trainer has one) and add the step's speed and weights to `totals`."""
        if self.optimizer is not None:
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        totals["tokens_per_s"] = sum(b["tokens"].numel() for b in micro_batches) / elapsed
        totals.update({f"weight/exit_{layer}": w for layer, w in weights.items()})
        return totals

    def _micro_step(self, batch: dict[str, torch.Tensor], weights: dict[int, float], normalizer: float) -> dict:
        states = self._backbone_states(batch)
        labels = batch["labels"]
        loss, out, confidence_losses = self._exit_loss(self.layers, states, labels, weights, normalizer)
        metrics: dict[str, float] = {}
        valid_count = max(float((labels != IGNORE_INDEX).float().sum()), 1)
        for layer, conf_loss in confidence_losses.items():
            metrics[f"confidence_bce/exit_{layer}"] = float(conf_loss.detach()) * normalizer / valid_count
        loss.backward()
        metrics["loss"] = float(loss.detach())
        for layer, stats in out.exits.items():
            metrics[f"ce/exit_{layer}"] = float(stats.ce)
            metrics[f"max_prob/exit_{layer}"] = float(stats.max_prob)
            if stats.agreement is not None:
                metrics[f"agreement/exit_{layer}"] = float(stats.agreement)
            if stats.kd is not None:
                metrics[f"kd/exit_{layer}"] = float(stats.kd)
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
        """Layer outputs at every exit (keys "8", "16", ...) and "final" if needed."""
        if self.cache is not None:
            cached = self.cache.get(batch["indices"])
            if cached is not None:
                return {key: value.to(self.device) for key, value in cached.items()}
        depths = self.layers + ([self.model.num_layers] if self.needs_final else [])
        hidden = self.model.hidden_states(batch["tokens"], depths)
        states = {str(layer): hidden[layer] for layer in self.layers}
        if self.needs_final:
            states["final"] = self.base.model.norm(hidden[self.model.num_layers])
        if self.cache is not None:
            self.cache.put(batch["indices"], states)
        return states

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- evaluation, state, results ---------------------------------------------------------

    def _heldout_quality(self) -> dict[int, ExitQuality]:
        with self._autocast():
            return heldout_quality(self.model, self.heldout.to(self.device))

    @staticmethod
    def _quality_metrics(quality: dict[int, ExitQuality]) -> dict[str, float]:
        metrics = {}
        for layer, q in quality.items():
            metrics[f"heldout_ce/exit_{layer}"] = q.cross_entropy
            if q.agreement is not None:
                metrics[f"heldout_agreement/exit_{layer}"] = q.agreement
        return metrics

    def _quality_from_metrics(self) -> dict[int, ExitQuality]:
        """The before-tuning quality a resumed run logged at step 0."""
        first = read_metrics(self.run_dir / "metrics.jsonl")[0]
        return {
            int(key.rsplit("_", 1)[1]): ExitQuality(
                int(key.rsplit("_", 1)[1]), value, first.get(key.replace("heldout_ce", "heldout_agreement"))
            )
            for key, value in first.items()
            if key.startswith("heldout_ce/")
        }

    def _checkpoint(self) -> None:
        if self.cache is not None:
            self.cache.flush()
        save_state(
            self.run_dir,
            TrainerState(
                step=self.step,
                exits=self.model.exits.state_dict(),
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                data=self.batches.state_dict(),
                rng=capture_rng(),
                extra={"tokens_seen": self.tokens_seen, "flat_stop": self.flat_stop.state_dict()},
            ),
        )
        self._record_config()

    def _restore(self, state: TrainerState) -> None:
        self.model.exits.load_state_dict(state.exits)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.batches.load_state_dict(state.data)
        restore_rng(state.rng)
        self.step = state.step
        self.tokens_seen = state.extra.get("tokens_seen", 0)
        if "flat_stop" in state.extra:
            self.flat_stop.load_state_dict(state.extra["flat_stop"])
        self.console.print(f"resumed {self.run_dir} at step {self.step}")

    def _tune_summary(self, before: dict[int, ExitQuality], after: dict[int, ExitQuality]) -> dict[str, Any]:
        """The manifest's `tune` entry: how long it ran and the held-out quality before and after."""
        heldout = {
            str(layer): {
                "cross_entropy_before": before[layer].cross_entropy,
                "cross_entropy_after": after[layer].cross_entropy,
                "agreement_before": before[layer].agreement,
                "agreement_after": after[layer].agreement,
            }
            for layer in after
        }
        return {"steps": self.step, "tokens_seen": self.tokens_seen, "stopped_flat": self.stopped_flat,
                "heldout": heldout}

    def _save_token_counts(self) -> None:
        """Token frequencies of the training targets: the kept vocabulary of FR-Spec drafting."""
        # From the config: a pipeline or tensor-parallel rank may hold none or part of the embeddings.
        vocab_size = int(self.base.hf_config["vocab_size"])
        save_token_counts(self.run_dir, count_tokens(self.data.train_labels, vocab_size, IGNORE_INDEX))

    def _write_results(self, before: dict[int, ExitQuality], after: dict[int, ExitQuality]) -> None:
        manifest = build_manifest(
            self.model, base_info(self.base), stage="tune", extra={"tune": self._tune_summary(before, after)}
        )
        save_exits(self.run_dir, self.model, manifest)
        self._save_token_counts()
        plot_loss_curves(
            read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / LOSS_PLOT_FILE,
            title=f"{self.base.name}: exits {self.layers} (train CE vs {self._ce_target_name()})",
            final_layer=self.model.num_layers,
        )
        self.console.print(_results_table(self.layers, self.model.num_layers, before, after))
        self.console.print(f"tuned exits written to [bold]{self.run_dir}[/] (loss curve: {LOSS_PLOT_FILE})")

    def _ce_target_name(self) -> str:
        return "the final layer's argmax" if self.cfg.loss.ce_target == "teacher" else "the data"

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


def _results_table(
    layers: list[int], num_layers: int, before: dict[int, ExitQuality], after: dict[int, ExitQuality]
) -> Table:
    """Rows for the exits and the final layer; a mesh run that never built the final layer has
    neither its row nor agreement (n/a)."""
    table = Table(title="held-out quality per exit")
    for column in ("layer", "CE before", "CE after", "agreement before", "agreement after"):
        table.add_column(column, justify="right")

    def share(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1%}"

    for layer in [layer for layer in [*layers, num_layers] if layer in after]:
        table.add_row(
            str(layer) if layer != num_layers else f"{layer} (final)",
            f"{before[layer].cross_entropy:.3f}", f"{after[layer].cross_entropy:.3f}",
            share(before[layer].agreement), share(after[layer].agreement),
        )
    return table
