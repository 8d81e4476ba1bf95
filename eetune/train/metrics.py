"""Where training metrics go: `metrics.jsonl` always, a loss-curve PNG, and W&B on request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


from eetune.config.schema import EetuneConfig
from eetune.rundir import atomic_write
from eetune.tracking import start_wandb

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss_curve.png"


class MetricLogger:
    """Appends one JSON line per logged step; mirrors to W&B when `logger.kind=wandb`."""

    def __init__(self, run_dir: Path, cfg: EetuneConfig, resume_step: int = 0) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        # On resume, drop lines logged after the checkpoint: they are about to be redone.
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
        atomic_write(self.path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept)))
        self._file = self.path.open("a", encoding="utf-8")
        self._wandb = start_wandb(run_dir, cfg) if cfg.logger.kind == "wandb" else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        if self._wandb is not None:
            self._wandb.summary.update(summary)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curves(records: list[dict[str, Any]], out: Path, title: str, final_layer: int | None = None) -> None:
    """Per-exit training CE (and held-out CE where logged) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    train_keys = sorted({k for r in records for k in r if k.startswith("ce/exit_")}, key=_layer_of)
    eval_keys = sorted({k for r in records for k in r if k.startswith("heldout_ce/exit_")}, key=_layer_of)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, key in enumerate(train_keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), color=colors[i % len(colors)], label=f"exit {_layer_of(key)} (train CE)")
    for i, key in enumerate(eval_keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        layer = _layer_of(key)
        name = f"final layer {layer}" if layer == final_layer else f"exit {layer}"
        ax.plot(*zip(*points), "o--", color=colors[i % len(colors)], label=f"{name} (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train_keys or eval_keys:
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _layer_of(key: str) -> int:
    return int(key.rsplit("_", 1)[1])
