"""The `eval` section and its tasks: what `eetune eval` measures and how."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from eetune.errors import EetuneError
from eetune.infer.policy import CONFIDENCES


@dataclass
class EvalTaskConfig:
    """One task of `eetune eval`: a JSONL file scored by `metric`."""

    name: str = "task"
    # A JSONL file; None means the bundled task of this name (eetune/data/tasks/<name>.jsonl).
    path: Optional[str] = None
    # rouge_l or f1: generation ({prompt, reference}); exact_match: multiple choice by
    # log-likelihood ({question, choices, answer}).
    metric: str = "rouge_l"


@dataclass
class EvalConfig:
    """`eetune eval run_dir=<tune run>`: per-exit metrics, a threshold sweep, tasks, a report."""

    # early_exit thresholds swept through the engine (1.0 is the full model).
    thresholds: List[float] = field(default_factory=lambda: [1.0, 0.9, 0.8, 0.6, 0.4, 0.2])
    # Confidence policies swept; `learned` only where every exit has an estimator.
    confidences: List[str] = field(default_factory=lambda: list(CONFIDENCES))
    # Also measure lossless self-speculative decoding (draft exit: the deepest, or draft_exit).
    self_speculative: bool = True
    draft_exit: Optional[int] = None
    draft_len: int = 4
    tasks: List[EvalTaskConfig] = field(
        default_factory=lambda: [
            EvalTaskConfig(name="summarize", metric="rouge_l"),
            EvalTaskConfig(name="qa", metric="f1"),
            EvalTaskConfig(name="mc", metric="exact_match"),
        ]
    )
    # Items used per task (None: all of them).
    max_items: Optional[int] = 6
    # Greedy tokens generated per prompt in the sweep.
    max_new_tokens: int = 32
    # Prompts the sweep decodes together (lock step, left padding) for `full` and `early_exit`;
    # self_speculative still decodes one prompt at a time. Outputs equal batch 1's (float32);
    # tokens/s is then the batch's throughput.
    batch_size: int = 1
    # Wrap generation prompts in the chat template.
    chat: bool = True
    # Bins of the reliability diagram / expected calibration error.
    ece_bins: int = 10
    # Timed repetitions of one layer step and one head evaluation (the cost model).
    timing_repeats: int = 30
    # Calibration: the fastest threshold whose greedy-token agreement with the full model
    # on the sweep's prompts is >= this, written to <run_dir>/calibration.json.
    target_agreement: float = 0.98
    calibrate: bool = True
    # Also sweep one threshold per exit where held-out statistics and the cost model put it
    # above the global threshold it was searched from (eetune.eval.per_exit); calibration keeps
    # it only where it beats every global threshold by more than noise.
    per_exit: bool = True
    # Where report.{json,md} and the plots go; None: <run_dir>/eval-<time>. Never overwritten.
    out_dir: Optional[str] = None

    def validate(self) -> None:
        pass

    def validate_run(self) -> None:
        """Every value `eval` reads, checked by the stage before anything slow runs."""
        if not self.thresholds:
            raise EetuneError("eval.thresholds is empty: give thresholds in (0, 1], e.g. eval.thresholds=[1.0,0.8,0.4]")
        for t in self.thresholds:
            if not 0.0 < t <= 1.0:
                raise EetuneError(f"eval.thresholds has {t}: every threshold must be in (0, 1] (1.0 = the full model)")
        for c in self.confidences:
            if c not in CONFIDENCES:
                raise EetuneError(f"eval.confidences has {c!r}: choose from {', '.join(CONFIDENCES)}")
        if not 0.0 < self.target_agreement <= 1.0:
            raise EetuneError(f"eval.target_agreement={self.target_agreement} must be in (0, 1]")
        for key in ("max_new_tokens", "batch_size", "ece_bins", "timing_repeats", "draft_len"):
            if getattr(self, key) < 1:
                raise EetuneError(f"eval.{key}={getattr(self, key)} must be >= 1")
        if self.max_items is not None and self.max_items < 1:
            raise EetuneError(f"eval.max_items={self.max_items} must be >= 1 (or null for every item)")
        if not self.tasks:
            raise EetuneError("eval.tasks is empty: give at least one task (the bundled ones: summarize, qa, mc)")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise EetuneError(f"eval.tasks names {names} repeat: give each task its own name")
