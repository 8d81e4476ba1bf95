"""Stage one of EE-Tuning: add exits to the frozen model and write them to a run dir.

With `parallel.tp` > 1 the frozen model is split over the ranks (read block by block, never whole
on one device); the exits are built whole on every rank from the same seed, and rank 0 writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def run(cfg: EetuneConfig, console: Console | None = None) -> AugmentResult | None:
    """Build the exits, score them on held-out text and write the run dir. On a mesh (tp x pp)
    the backbone is split over the ranks and the exits stay whole; rank 0 writes. None in a parent
    that re-launched itself under torchrun."""
    console = console or make_console()
    e = cfg.exits
    specs = exit_specs(e.layers, arch=e.arch, init=e.init, head=e.head, confidence=e.confidence, norm_init=e.norm_init)
    check_seq_len(cfg.data.seq_len, cfg.model.max_seq_len)
    from eetune.parallel import on_inference_mesh

    if not on_inference_mesh(cfg):
        base = load_base_model(**vars(cfg.model))
        check_specs(specs, base.num_layers)
        torch.manual_seed(cfg.seed)
        return _augment(cfg, base, EarlyExitModel(base.model, specs, init_std=cfg.exits.init_std), console)
    from eetune.parallel.launch import stage_ranks
    from eetune.parallel.load import NewExits, build_inference_model

    with stage_ranks(cfg, console) as topology:
        if topology is None:
            return None
        base, model = build_inference_model(cfg.model, None, topology, split_exits=False,
                                            new_exits=NewExits(specs, cfg.exits.init_std, cfg.seed))
        if not topology.is_main:
            console = Console(quiet=True)
        return _augment(cfg, base, model, console, writes=topology.is_main)


def _augment(cfg: EetuneConfig, base: Any, model: EarlyExitModel, console: Console, *, writes: bool = True) -> AugmentResult:
    parameters = {
        layer: sum(p.numel() for p in model.exit(layer).parameters() if p.requires_grad)
        for layer in model.exit_layers
    }
    with console.status("scoring exits on held-out text"):
        quality = heldout_quality(model, heldout_batch(cfg.data, base.tokenizer))

    if not writes:
        return AugmentResult(Path(cfg.run_dir), parameters, quality)
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
