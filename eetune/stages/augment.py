"""Stage one of EE-Tuning: add exits to the frozen model and write them to a run dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from eetune.config.schema import EetuneConfig
from eetune.console import make_console
from eetune.data.corpus import check_seq_len, heldout_batch
from eetune.eval.heldout import ExitQuality, heldout_quality
from eetune.exits import EarlyExitModel, build_manifest, check_specs, exit_specs, save_exits
from eetune.rundir import new_run_dir
from eetune.models import base_info, load_base_model
from eetune.rundir import write_config


@dataclass
class AugmentResult:
    run_dir: Path
    exit_parameters: dict[int, int]  # trainable parameters per exit
    quality: dict[int, ExitQuality]  # held-out, before tuning; key num_layers is the final layer


def run(cfg: EetuneConfig, console: Console | None = None) -> AugmentResult:
    console = console or make_console()
    base = load_base_model(**vars(cfg.model))
    e = cfg.exits
    specs = exit_specs(e.layers, arch=e.arch, init=e.init, head=e.head, confidence=e.confidence, norm_init=e.norm_init)
    check_specs(specs, base.num_layers)
    check_seq_len(cfg.data.seq_len, cfg.model.max_seq_len)

    torch.manual_seed(cfg.seed)
    model = EarlyExitModel(base.model, specs, init_std=cfg.exits.init_std)
    parameters = {
        layer: sum(p.numel() for p in model.exit(layer).parameters() if p.requires_grad)
        for layer in model.exit_layers
    }
    with console.status("scoring exits on held-out text"):
        quality = heldout_quality(model, heldout_batch(cfg.data, base.tokenizer))

    heldout = {str(layer): {"cross_entropy": q.cross_entropy, "agreement": q.agreement} for layer, q in quality.items()}
    manifest = build_manifest(model, base_info(base), stage="augment", extra={"heldout_before_tuning": heldout})
    with new_run_dir(cfg.run_dir) as staging:
        write_config(staging, cfg)
        save_exits(staging, model, manifest)

    console.print(_exit_table(model, parameters, quality))
    console.print(f"exits written to [bold]{cfg.run_dir}[/]")
    return AugmentResult(Path(cfg.run_dir), parameters, quality)


def _exit_table(model: EarlyExitModel, parameters: dict[int, int], quality: dict[int, ExitQuality]) -> Table:
    table = Table(title="early exits (before tuning)")
    for column in ("layer", "arch", "init", "head", "trainable params", "held-out CE", "top-1 agreement"):
        table.add_column(column, justify="right" if column not in ("arch", "init", "head") else "left")
    for spec in model.specs:
        q = quality[spec.layer]
        table.add_row(
            str(spec.layer), spec.arch, spec.init, spec.head, f"{parameters[spec.layer]:,}",
            f"{q.cross_entropy:.3f}", f"{q.agreement:.1%}",
        )
    final = quality[model.num_layers]
    table.add_row(str(model.num_layers), "final", "-", "-", "-", f"{final.cross_entropy:.3f}", "100.0%", style="dim")
    return table
