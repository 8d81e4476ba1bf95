"""A tune run's result: what `run` returns, read back from a finished run dir, and shown as a table."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from eetune.eval.heldout import ExitQuality
from eetune.exits.checkpoint import MANIFEST_FILE
from eetune.train.metrics import read_metrics


@dataclass
class TuneResult:
    run_dir: Path
    steps: int
    tokens_seen: int
    before: dict[int, ExitQuality]  # held-out quality at the start (key num_layers: final layer)
    after: dict[int, ExitQuality]


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


def tune_summary(steps: int, tokens_seen: int, stopped_flat: bool, before: dict[int, ExitQuality],
                 after: dict[int, ExitQuality]) -> dict[str, Any]:
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
    return {"steps": steps, "tokens_seen": tokens_seen, "stopped_flat": stopped_flat, "heldout": heldout}


def quality_metrics(quality: dict[int, ExitQuality]) -> dict[str, float]:
    """Held-out quality as logged metrics (heldout_ce/exit_8, heldout_agreement/exit_8, ...)."""
    metrics = {}
    for layer, q in quality.items():
        metrics[f"heldout_ce/exit_{layer}"] = q.cross_entropy
        if q.agreement is not None:
            metrics[f"heldout_agreement/exit_{layer}"] = q.agreement
    return metrics


def quality_from_metrics(run_dir: Path) -> dict[int, ExitQuality]:
    """The before-tuning quality a resumed run logged at step 0."""
    first = read_metrics(Path(run_dir) / "metrics.jsonl")[0]
    return {
        int(key.rsplit("_", 1)[1]): ExitQuality(
            int(key.rsplit("_", 1)[1]), value, first.get(key.replace("heldout_ce", "heldout_agreement"))
        )
        for key, value in first.items()
        if key.startswith("heldout_ce/")
    }


def results_table(
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
