"""What `tune` reads: the optimizer, the loss, the training loop and the metrics logger."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from eetune.config.checks import check_choices
from eetune.errors import EetuneError


@dataclass
class OptimConfig:
    """AdamW over exit parameters only, with warmup then decay."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 10
    # After warmup: cosine, linear or constant.
    decay: str = "cosine"
    # The schedule ends at lr * min_lr_ratio.
    min_lr_ratio: float = 0.1
    # Clip the global gradient norm of exit parameters (0 disables).
    grad_clip: float = 1.0
    grad_accum: int = 1

    def validate(self) -> None:
        check_choices(self, "optim")

    def validate_run(self) -> None:
        """Checked by the stage that reads this section, before anything slow or written
        (not at composition: `--print-config` and other stages take these values as they are)."""
        if self.grad_accum < 1:
            raise EetuneError(f"optim.grad_accum={self.grad_accum} must be >= 1")


@dataclass
class LossConfig:
    """Sum over exits of w_i * loss_i.

    The backbone is frozen and exits share no trainable parameter, so a constant w_i only
    scales exit i's gradients, which AdamW normalises away per parameter: exit_weights change
    tuning only through gradient clipping and AdamW's eps. A linear/cosine warm-up changes
    w_i during the run, which AdamW does not cancel (scripts/bench/converge.py --weights and
    the README's Losses). They are kept because the paper has them.
    """

    # w_i per exit, in exits.layers order; empty means 1.0 for every exit.
    exit_weights: List[float] = field(default_factory=list)
    # constant: w_i fixed; linear/cosine: w_i warmed up from 0 over `warmup_steps`;
    # dynamic: each token's loss weighted by the exit's own (detached) max probability.
    weighting: str = "constant"
    warmup_steps: int = 0
    # CE against the data's next token (`labels`) or the final layer's argmax (`teacher`).
    ce_target: str = "labels"
    # Per-token loss = (1 - kd_alpha) * CE + kd_alpha * KL(final || exit).
    kd_alpha: float = 0.0
    kd_temperature: float = 1.0
    # Weight of the confidence estimators' BCE loss (when exits.confidence != none).
    confidence_weight: float = 1.0
    # Tokens per chunk of the fused head + loss: the [tokens, vocab] logits never exist whole.
    chunk_size: int = 1024

    def validate(self) -> None:
        check_choices(self, "loss")

    def validate_run(self) -> None:
        """Checked by the stage that reads this section, before anything slow or written
        (not at composition: `--print-config` and other stages take these values as they are)."""
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise EetuneError(f"loss.kd_alpha={self.kd_alpha} must be in [0, 1]")
        if self.kd_temperature <= 0:
            raise EetuneError(f"loss.kd_temperature={self.kd_temperature} must be > 0")
        if self.chunk_size < 1:
            raise EetuneError(f"loss.chunk_size={self.chunk_size} must be >= 1")


@dataclass
class TrainConfig:
    # Optimizer steps. A resume may raise it (or change the cadence keys below, flat_patience and
    # the logger): the lr schedule is then the one a run configured with the new total has,
    # evaluated from the current step on (warmup + decay recomputed for the new total).
    steps: int = 100
    log_every: int = 1
    # Score exits on held-out text every N steps (0: only at the end).
    eval_every: int = 0
    # Save resumable state every N steps (0: only at the end).
    checkpoint_every: int = 50
    # Start from the exits of an `augment` run dir instead of building them from `exits`.
    init_from: Optional[str] = None
    # Stop before `steps` once held-out exit losses flatten: after `flat_patience` held-out
    # evaluations (every `eval_every` steps) in which no exit's CE fell by more than
    # `flat_min_delta` (relative) below its best so far. 0 disables.
    flat_patience: int = 0
    flat_min_delta: float = 0.005

    def validate(self) -> None:
        pass

    def validate_run(self) -> None:
        """Checked by the stage that reads this section, before anything slow or written
        (not at composition: `--print-config` and other stages take these values as they are)."""
        if self.steps < 1:
            raise EetuneError(f"train.steps={self.steps} must be >= 1")
        if self.flat_patience < 0 or self.flat_min_delta < 0:
            raise EetuneError("train.flat_patience and train.flat_min_delta must be >= 0")
        if self.flat_patience > 0 and self.eval_every < 1:
            raise EetuneError(
                "train.flat_patience needs held-out evaluations to watch: set train.eval_every to a step count"
            )


@dataclass
class LoggerConfig:
    # none: metrics.jsonl + plots only (no account needed); wandb: also Weights & Biases.
    kind: str = "none"
    project: str = "eetune"
    entity: Optional[str] = None
    name: Optional[str] = None
    # W&B mode: online, offline or disabled (WANDB_MODE in the environment also works).
    mode: Optional[str] = None

    def validate(self) -> None:
        check_choices(self, "logger")
