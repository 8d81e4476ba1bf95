"""report.json (everything measured), report.md (the tables a person reads), W&B (the same)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from eetune.config.schema import EetuneConfig
from eetune.eval.exit_metrics import estimator_metrics, per_exit_metrics, policy_metrics
from eetune.eval.heldout import TokenStats
from eetune.eval.per_exit import PerExitPoint
from eetune.eval.sweep import Prompt, SweepRow
from eetune.eval.tasks import Task
from eetune.eval.timing import Costs
from eetune.exits import EarlyExitModel
from eetune.infer.policy import describe_thresholds
from eetune.rundir import atomic_write_json, atomic_write_text
from eetune.tracking import start_wandb

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "–"
    if kind == "%":
        return f"{100 * value:.1f}%"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "ms":
        return f"{1000 * value:.3f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def sweep_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The main table: one row per decoding setting."""
    tasks = report["tasks"]
    header = ["setting", "tok/s", "speedup", "mean layers", "token agreement", "ROUGE-L vs full"]
    header += [f"{t['name']} {t['metric']}" for t in tasks] + ["draft acceptance"]
    rows = []
    for r in report["sweep"]:
        row = [
            r["setting"], f"{r['tokens_per_s']:.1f}", _fmt(r["speedup"], "x"),
            f"{r['mean_layers']:.1f}/{report['num_layers']}", _fmt(r["token_agreement"], "%"),
            _fmt(r["rouge_l_vs_full"]),
        ]
        row += [_fmt(r["task_scores"].get(t["name"])) for t in tasks]
        row.append(_fmt(r["acceptance_rate"], "%"))
        rows.append(row)
    return header, rows


def per_exit_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["layer", "CE", "perplexity", "agreement w/ final", "ECE", "ECE vs final's top-1",
              "estimator precision@0.5", "estimator recall@0.5"]
    rows = []
    for e in report["per_exit"]:
        est = e["estimator"] or {}
        rows.append([
            f"{e['layer']} (final)" if e["final"] else str(e["layer"]), _fmt(e["cross_entropy"]),
            f"{e['perplexity']:.1f}", _fmt(e["agreement"], "%"), _fmt(e["ece"]), _fmt(e["ece_vs_final"]),
            _fmt(est.get("precision"), "%"), _fmt(est.get("recall"), "%"),
        ])
    return header, rows


def policy_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    layers = report["exit_layers"] + [report["num_layers"]]
    header = ["policy", "threshold"] + [f"at {layer}" for layer in layers] + ["agreement", "modelled speedup"]
    rows = []
    for p in [*report["policies"], report["oracle"]]:
        rows.append(
            [p["confidence"], _fmt(p.get("threshold"))]
            + [_fmt(p["fractions"][str(layer)], "%") for layer in layers]
            + [_fmt(p["agreement"], "%"), _fmt(p["speedup"], "x")]
        )
    return header, rows


def estimator_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["exit", "threshold", "precision", "recall", "predicted agree", "actually agree"]
    rows = [
        [str(e["layer"]), f"{e['threshold']:g}", _fmt(e["precision"], "%"), _fmt(e["recall"], "%"),
         str(e["predicted"]), str(e["actual"])]
        for e in report["estimator"]
    ]
    return header, rows


def costs_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    c = report["costs"]
    rows = [["decoder layer step", _fmt(c["layer_s"], "ms")], ["exit head + max-prob", _fmt(c["head_s"], "ms")],
            ["final norm + LM head", _fmt(c["final_s"], "ms")]]
    for rows_minus_one, seconds in enumerate(c.get("layer_rows_s", ())[1:], start=1):
        rows += [[f"decoder layer over {rows_minus_one + 1} positions (catch-up)", _fmt(seconds, "ms")]]
    rows += [[f"exit {layer} module", _fmt(s, "ms")] for layer, s in c["exit_s"].items()]
    rows += [[f"exit {layer} estimator", _fmt(s, "ms")] for layer, s in c["estimator_s"].items()]
    return ["piece (batch 1, one token)", "ms"], rows


# How each `data.heldout_by` split was made, as the report says it.
HELDOUT_SPLITS = {
    "tail": "the tail of the tuning data, which tuning never saw",
    "prompt": "from documents held out by prompt: tuning saw no sample of these prompts",
}


def render_markdown(report: dict[str, Any], plots: dict[str, str]) -> str:
    sweep = report["sweep_info"]
    held = report["heldout"]
    parts = [
        f"# {report['title']}",
        f"Run dir `{report['run_dir']}` · exits at layers {report['exit_layers']} of {report['num_layers']} · "
        f"{report['model']['name']} ({report['model']['dtype']}) · eval took {report['elapsed_s']:.0f} s",
        "## Decoding sweep (the real engine, greedy)",
        f"{sweep['prompts']} prompts from the generation tasks, up to {sweep['max_new_tokens']} new tokens each, "
        f"{_batch_note(sweep.get('batch_size', 1))}. Speedup: decode tokens/s over the full model's. "
        "Token agreement and ROUGE-L compare each "
        "output with the full model's output for the same prompt; task columns score outputs against the "
        "references (multiple choice: log-likelihood under the setting's exit policy).",
        md_table(*sweep_table(report)),
        *_spec_note(report),
        f"![speed vs quality]({plots['speed_quality']})",
        f"![exit-layer histogram]({plots['exit_histogram']})",
        "## Per-exit quality on held-out text",
        f"{held['tokens']} held-out tokens ({held['sequences']} sequences of {held['seq_len']}), "
        f"{HELDOUT_SPLITS.get(held.get('split'), 'held out of the tuning data')}.",
        md_table(*per_exit_table(report)),
        f"![per-exit CE and agreement]({plots['exits']})",
        f"![reliability]({plots['reliability']})",
        "## Exit policies on held-out text (teacher-forced) and the oracle bound",
        "Where tokens would leave under each policy, agreement with the final layer, and the speedup the "
        "cost model gives (measured per-layer and per-head time, below). The oracle leaves each token at "
        "the shallowest exit whose top-1 equals the final layer's: the best any confidence policy could do "
        "with these exits at 100% agreement.",
        md_table(*policy_table(report)),
        f"Gap: the oracle reaches **{report['oracle']['speedup']:.2f}x**; the best max-prob threshold with "
        f">= {100 * report['target_agreement']:.0f}% agreement here reaches "
        f"**{_fmt(report['best_policy_speedup'], 'x')}**.",
    ]
    searched = [(confidence, p) for confidence, points in report.get("per_exit_thresholds", {}).items() for p in points]
    if searched:
        rows = [[confidence, f"{p['start']:g}", describe_thresholds(p["thresholds"]), _fmt(p["agreement"], "%"),
                 _fmt(p["speedup"], "x")] for confidence, p in searched]
        parts += ["One threshold per exit, searched from each global threshold for the most modelled speed at no "
                  "less agreement (1 = that exit is never checked); each is decoded in the sweep above.",
                  md_table(["policy", "from", "thresholds per exit", "agreement", "modelled speedup"], rows)]
    if report["estimator"]:
        parts += ["## Learned confidence estimators: predicting agreement with the final layer",
                  md_table(*estimator_table(report))]
    parts += ["## Cost model", md_table(*costs_table(report))]
    cal = report.get("calibration")
    if cal:
        rows = [[c["confidence"], _threshold_cell(c), _fmt(c["agreement"], "%"), _fmt(c["speedup"], "x")]
                for c in cal["thresholds"].values()]
        parts += [
            "## Calibration",
            f"Fastest threshold with greedy-token agreement >= {100 * cal['target_agreement']:.0f}% on the sweep's "
            f"prompts, written to `{cal['path']}`; `eetune generate` (and `serve`) use it when no threshold is given. "
            "A/B/C: one threshold per exit, shallowest first (picked only where it beats every global threshold "
            "by more than noise).",
            md_table(["confidence", "threshold", "agreement", "speedup"], rows),
        ]
    tasks = [[t["name"], t["metric"], str(t["items"]), f"`{t['path']}`"] for t in report["tasks"]]
    parts += ["## Tasks", md_table(["task", "metric", "items", "file"], tasks)]
    return "\n\n".join(parts) + "\n"


def _threshold_cell(calibration: dict[str, Any]) -> str:
    per_exit = calibration.get("exit_thresholds")
    return describe_thresholds(calibration["threshold"] if per_exit is None else per_exit)


def _batch_note(batch_size: int) -> str:
    if batch_size == 1:
        return "batch 1"
    return (f"batch {batch_size} (full and early_exit decode {batch_size} prompts together, so tok/s is a batch's "
            "throughput; self_speculative decodes one prompt at a time)")


def _spec_note(report: dict[str, Any]) -> list[str]:
    """Why a lossless method can show < 100% agreement: low-precision rounding, not the method."""
    spec = [r for r in report["sweep"] if r["mode"] == "self_speculative" and r["token_agreement"] < 1.0]
    if not spec or report["model"]["dtype"] == "float32":
        return []
    return [
        f"self_speculative is lossless in exact arithmetic; in {report['model']['dtype']} its verify forward (several "
        "positions at once) rounds differently from one-token steps, so near-tied greedy choices can flip."
    ]


def write_report(out_dir: Path, report: dict[str, Any], plots: dict[str, Path]) -> None:
    names = {key: path.name for key, path in plots.items()}
    atomic_write_json(out_dir / REPORT_JSON, {**report, "plots": names})
    atomic_write_text(out_dir / REPORT_MD, render_markdown(report, names))


def log_wandb(out_dir: Path, cfg: EetuneConfig, report: dict[str, Any], plots: dict[str, Path]) -> None:
    """The report's tables as W&B tables, its plots as images, headline numbers in the summary."""
    import wandb

    run = start_wandb(out_dir, cfg)
    try:
        tables = {"sweep": sweep_table, "per_exit": per_exit_table, "policies": policy_table, "costs": costs_table}
        if report["estimator"]:
            tables["estimator"] = estimator_table
        logged: dict[str, Any] = {
            f"eval/{name}": wandb.Table(columns=list(header), data=[list(row) for row in rows])
            for name, (header, rows) in ((name, fn(report)) for name, fn in tables.items())
        }
        logged.update({f"eval/{name}": wandb.Image(str(path)) for name, path in plots.items()})
        run.log(logged)
        summary = {"eval/oracle_speedup": report["oracle"]["speedup"]}
        for r in report["sweep"]:
            summary[f"eval/speedup/{r['setting']}"] = r["speedup"]
            summary[f"eval/token_agreement/{r['setting']}"] = r["token_agreement"]
        for e in report["per_exit"]:
            summary[f"eval/cross_entropy/layer_{e['layer']}"] = e["cross_entropy"]
            summary[f"eval/agreement/layer_{e['layer']}"] = e["agreement"]
        run.summary.update(summary)
    finally:
        run.finish()


def build_report(
    cfg: EetuneConfig, *, model_name: str, dtype: str, model: EarlyExitModel, stats: TokenStats, costs: Costs,
    tasks: list[Task], rows: list[SweepRow], choice_scores: dict[str, dict[str, float]],
    heldout_shape: tuple[int, ...], prompts: list[Prompt], per_exit_thresholds: dict[str, list[PerExitPoint]] | None = None,
) -> dict[str, Any]:
    """Everything measured, as report.json holds it."""
    thresholds = [float(t) for t in cfg.eval.thresholds]
    policies = policy_metrics(stats, costs, thresholds, list(dict.fromkeys(cfg.eval.confidences)))
    sweep = []
    for row in rows:
        entry = row.summary()
        scores = {}
        for task in tasks:
            if task.is_generation:
                pairs = [(o, p) for o, p in zip(row.outputs, prompts) if p.task == task.name]
                scores[task.name] = sum(task.score_generation(o.text, task.items[p.index]) for o, p in pairs) / len(pairs)
            else:
                scores[task.name] = choice_scores[task.name][row.setting.name]
        entry["task_scores"] = scores
        entry["outputs"] = [{"task": p.task, "item": p.index, "text": o.text} for o, p in zip(row.outputs, prompts)]
        sweep.append(entry)
    target = cfg.eval.target_agreement
    eligible = [p["speedup"] for p in policies["policies"] if p["confidence"] == "max_prob" and p["agreement"] >= target]
    return {
        "title": f"eetune eval: {Path(cfg.run_dir).name}",
        "run_dir": str(cfg.run_dir),
        "model": {"name": model_name, "dtype": dtype},
        "exit_layers": model.exit_layers,
        "num_layers": model.num_layers,
        "heldout": {"sequences": heldout_shape[0], "seq_len": heldout_shape[1], "tokens": stats.num_tokens,
                    "split": cfg.data.heldout_by},
        "per_exit": per_exit_metrics(stats, cfg.eval.ece_bins),
        **policies,
        "best_policy_speedup": max(eligible, default=None),
        # One threshold per exit, searched teacher-forced from each global threshold (eetune.eval.per_exit).
        "per_exit_thresholds": {confidence: [{**asdict(p), "thresholds": list(p.thresholds)} for p in points]
                                for confidence, points in (per_exit_thresholds or {}).items()},
        "target_agreement": target,
        "estimator": estimator_metrics(stats, thresholds),
        "costs": {**asdict(costs), "exit_s": {str(k): v for k, v in costs.exit_s.items()},
                  "estimator_s": {str(k): v for k, v in costs.estimator_s.items()}},
        "sweep_info": {"prompts": len(prompts), "max_new_tokens": cfg.eval.max_new_tokens, "chat": cfg.eval.chat,
                       "batch_size": cfg.eval.batch_size},
        "sweep": sweep,
        "tasks": [{"name": t.name, "metric": t.metric, "items": len(t.items), "path": str(t.path)} for t in tasks],
    }
