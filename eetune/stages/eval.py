"""`eetune eval run_dir=<tune run>`: what each exit is worth, the speed/quality curve, a report.

1. Per-exit metrics on the held-out split of the tuning data (teacher-forced): CE, perplexity,
   agreement with the final layer, calibration, where each threshold would send tokens, the
   learned estimators' precision/recall, and the oracle bound, costed with measured times.
2. A sweep of decoding settings through the real engine on the generation tasks' prompts: every
   confidence policy at every threshold, plus one threshold per exit where the held-out
   statistics say it beats the global one (eval.per_exit; eetune.eval.per_exit).
3. Task metrics per setting (ROUGE-L, F1; multiple choice by log-likelihood under the policy).
4. Calibration of the default threshold into <run_dir>/calibration.json.
5. report.json, report.md, PNG plots in a fresh output dir; W&B when logger=wandb.

With `parallel.tp` x `parallel.pp` > 1 every rank of the decoding mesh runs all of it and rank 0 writes.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from eetune.config import EetuneConfig
from eetune.console import make_console
from eetune.data import heldout_batch
from eetune.data.chat import build_prompt_ids, stop_token_ids
from eetune.errors import EetuneError
from eetune.eval.calibration import (
    CALIBRATION_FILE, calibration_source, calibrations_from_sweep, placement, write_calibration,
)
from eetune.eval.heldout import token_stats
from eetune.eval.per_exit import PerExitPoint, per_exit_candidates
from eetune.eval.plots import draw_all
from eetune.eval.report import REPORT_MD, build_report, log_wandb, write_report
from eetune.eval.scoring import choice_accuracy, exit_confidence
from eetune.eval.sweep import Prompt, run_sweep, sweep_settings
from eetune.eval.tasks import load_task
from eetune.eval.timing import measure_costs
from eetune.exits import load_exits, read_manifest
from eetune.infer.draft_vocab import load_token_order
from eetune.infer.engine import Engine
from eetune.infer.policy import describe_thresholds
from eetune.models import load_base_model
from eetune.rundir import is_builtin, new_run_dir, resolve_run_dir


@dataclass
class EvalResult:
    out_dir: Path
    report: dict[str, Any]
    plots: dict[str, Path]
    calibration: Path | None


def output_dir(cfg: EetuneConfig) -> Path:
    if cfg.eval.out_dir:
        return Path(cfg.eval.out_dir).expanduser()
    stamp = f"eval-{dt.datetime.now():%Y%m%d-%H%M%S}"
    if is_builtin(cfg.run_dir):  # read-only: the report goes under runs/
        return Path("runs") / f"{Path(cfg.run_dir).name}-{stamp}"
    return Path(cfg.run_dir) / stamp


def run(cfg: EetuneConfig, console: Console | None = None) -> EvalResult | None:
    """Evaluate `run_dir`'s exits; on a mesh (`parallel.tp` x `parallel.pp` ranks) every rank measures and rank 0
    writes. None in a parent that re-launched itself under torchrun."""
    console = console or make_console()
    started = time.perf_counter()
    cfg.eval.validate_run()
    cfg.run_dir = resolve_run_dir(cfg.run_dir)
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir():
        raise EetuneError(f"run dir not found: {run_dir}: pass run_dir=<a tune (or augment) run dir>")
    read_manifest(run_dir)
    tasks = [load_task(t.name, t.path, t.metric, cfg.eval.max_items) for t in cfg.eval.tasks]
    if not any(task.is_generation for task in tasks):
        raise EetuneError("eval.tasks has no generation task (metric rouge_l or f1): the decoding sweep needs prompts")
    out_dir = output_dir(cfg)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise EetuneError(f"eval output dir {out_dir} already exists and is not empty: choose another eval.out_dir=...")

    from eetune.parallel import on_inference_mesh

    if not on_inference_mesh(cfg):
        base = load_base_model(**vars(cfg.model))
        model = load_exits(run_dir, base.model, base.fingerprint, base.checkpoint_dir)
        return _evaluate(cfg, base, model, tasks, out_dir, console, started)
    from eetune.parallel.launch import stage_ranks
    from eetune.parallel.load import build_inference_model
    from eetune.parallel.mesh import from_rank0

    cfg.eval.out_dir = str(out_dir)  # one output dir for every rank, timestamp included
    with stage_ranks(cfg, console) as topology:
        if topology is None:
            return None
        base, model = build_inference_model(cfg.model, str(run_dir), topology)
        if not topology.is_main:
            console = Console(quiet=True)
        return _evaluate(cfg, base, model, tasks, out_dir, console, started, writes=topology.is_main,
                         share=from_rank0)


def _evaluate(
    cfg: EetuneConfig, base: Any, model: Any, tasks: list, out_dir: Path, console: Console, started: float,
    *, writes: bool = True, share: Callable[[Any], Any] = lambda value: value,
) -> EvalResult:
    """Measure, sweep, score and calibrate; with `writes` (rank 0 of a mesh), write and print it all.
    `share` gives every rank of a mesh rank 0's value (the per-exit thresholds, chosen from timings)."""
    run_dir = Path(cfg.run_dir)
    if base.tokenizer is None:
        raise EetuneError(f"model {base.name} has no tokenizer: eval needs one to read tasks")
    batch = heldout_batch(cfg.data, base.tokenizer, max_seq_len=cfg.model.max_seq_len)
    batch = batch.to(base.model.tok_embeddings.weight.device)
    stop_ids = frozenset(stop_token_ids(base.tokenizer))
    # The token order generate and serve decode with: the `frequent` policy's head, as theirs.
    token_order = load_token_order(Path(cfg.run_dir), always=tuple(sorted(stop_ids)))
    prompts = [
        Prompt(build_prompt_ids(base.tokenizer, item.prompt, cfg.eval.chat), task.name, i)
        for task in tasks if task.is_generation for i, item in enumerate(task.items)
    ]
    choice_tasks = [task for task in tasks if not task.is_generation]

    progress = Progress(
        TextColumn("[bold]eval[/] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    )
    with progress:
        step = progress.add_task("held-out per-exit metrics", total=1)
        stats = token_stats(model, batch, token_order)
        progress.update(step, advance=1, description="timing one layer step and one head")
        costs = measure_costs(model, repeats=cfg.eval.timing_repeats)
        # Chosen from this rank's timings: on a mesh every rank must sweep rank 0's choice.
        per_exit = share(_per_exit_thresholds(cfg, stats, costs) if cfg.eval.per_exit and writes else {})
        settings = sweep_settings(cfg, model, console, has_token_order=token_order is not None,
                                  per_exit={c: [p.thresholds for p in points] for c, points in per_exit.items()})
        step = progress.add_task("decoding sweep", total=len(prompts) * len(settings))
        rows = run_sweep(
            Engine(model, max_batch_size=cfg.eval.batch_size, token_order=token_order), prompts, settings,
            max_new_tokens=cfg.eval.max_new_tokens, stop_ids=stop_ids,
            decode=lambda ids: base.tokenizer.decode(ids, skip_special_tokens=True),
            advance=lambda: progress.advance(step), seed=cfg.seed, batch_size=cfg.eval.batch_size,
        )
        step = progress.add_task("multiple-choice tasks", total=sum(len(t.items) for t in choice_tasks))
        choice_scores = {
            task.name: choice_accuracy(model, base.tokenizer, task, settings, lambda: progress.advance(step), token_order)
            for task in choice_tasks
        }

    report = build_report(
        cfg, model_name=base.name, dtype=str(base.dtype).removeprefix("torch."), model=model, stats=stats,
        costs=costs, tasks=tasks, rows=rows, choice_scores=choice_scores, heldout_shape=tuple(batch.shape),
        prompts=prompts, per_exit_thresholds=per_exit,
    )
    calibrations = calibrations_from_sweep(cfg, rows) if cfg.eval.calibrate else []
    # A shipped run dir is read-only: its calibration is the one it shipped with; this one goes beside the report.
    calibration_dir = out_dir if is_builtin(run_dir) else run_dir
    if calibrations:
        report["calibration"] = {
            "path": str(calibration_dir / CALIBRATION_FILE), "target_agreement": cfg.eval.target_agreement,
            "thresholds": {c.confidence: asdict(c) for c in calibrations},
        }
    report["elapsed_s"] = time.perf_counter() - started
    if not writes:
        return EvalResult(out_dir, report, {}, None)
    with new_run_dir(out_dir) as staging:
        plots = draw_all(report, staging)
        write_report(staging, report, plots)
        if cfg.logger.kind == "wandb":
            named = replace(cfg, logger=replace(cfg.logger, name=cfg.logger.name or out_dir.name))
            log_wandb(staging, named, report, plots)
    plots = {key: out_dir / path.name for key, path in plots.items()}
    # Recorded once the report exists: a failed eval leaves the previous calibration in place.
    measured_on = calibration_source(cfg, prompts, rows, placement(base.model))
    calibration = (write_calibration(run_dir, calibrations, measured_on, into=calibration_dir)
                   if calibrations else None)
    print_summary(console, report, out_dir, plots, calibration)
    return EvalResult(out_dir, report, plots, calibration)


def _per_exit_thresholds(cfg: EetuneConfig, stats: Any, costs: Any) -> dict[str, list[PerExitPoint]]:
    """confidence policy -> per-exit thresholds worth decoding beside the global ones (eetune.eval.per_exit)."""
    thresholds = [float(t) for t in cfg.eval.thresholds]
    return {
        confidence: per_exit_candidates(stats, costs, confidence, thresholds)
        for confidence in dict.fromkeys(cfg.eval.confidences)
        if exit_confidence(stats.layers, stats.exit_layers, confidence) is not None and len(stats.exit_layers) > 1
    }


def print_summary(console: Console, report: dict[str, Any], out_dir: Path, plots: dict[str, Path], calibration: Path | None) -> None:
    # A compact table that fits 80 columns; report.md has the full one.
    tasks = [t["name"] for t in report["tasks"]]
    info = report["sweep_info"]
    table = Table(title=f"decoding sweep ({info['prompts']} prompts, batch {info['batch_size']}, greedy)",
                  box=box.SIMPLE_HEAD, show_edge=False, padding=0)
    for i, column in enumerate(["setting", "tok/s", "speed", "layers", "agree", "R-L", *tasks, "acc"]):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=True)
    for r in report["sweep"]:
        accept = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.0%}"
        table.add_row(
            r["setting"], f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.2f}x", f"{r['mean_layers']:.1f}",
            f"{r['token_agreement']:.0%}", f"{r['rouge_l_vs_full']:.2f}",
            *(f"{r['task_scores'][name]:.2f}" for name in tasks), accept,
        )
    console.print(table)
    console.print(f"oracle bound (perfect policy, 100% agreement): {report['oracle']['speedup']:.2f}x by the cost model")
    if calibration is not None:
        for confidence, c in report["calibration"]["thresholds"].items():
            which = ("threshold" if c.get("exit_thresholds") is None else "thresholds per exit")
            value = describe_thresholds(c["threshold"] if c.get("exit_thresholds") is None else c["exit_thresholds"])
            console.print(f"calibrated {confidence} {which}: {value} "
                          f"(agreement {c['agreement']:.1%}, {c['speedup']:.2f}x) -> {calibration}")
    console.print(f"report: [bold]{out_dir / REPORT_MD}[/] (+ report.json); plots: " + ", ".join(str(p) for p in plots.values()))
