"""Tuning cost per step: full fine-tuning vs tuning only the exits, side by side in one run.

Models: SmolLM2-135M (its vocabulary head is ~21% of the per-token matmul work) and a random
model shaped like Llama-2-13B scaled down 8x in width, FFN, heads and vocabulary (same
vocab-to-width ratio and head_dim), where the head matters far less. Both in fp32 and bf16.
Cases, on the same batches:
  full          AdamW over every parameter; model forward + F.cross_entropy over the full
                logits (a plain full fine-tune; in bf16 the weights and AdamW state are bf16,
                as in torchtune's full fine-tune recipes);
  exits_shared  eetune's real `Trainer.train_step`: 3 `mlp` exits sharing the frozen LM head;
  exits_copy    the same with a trainable copy of the head per exit (`exits.head=copy`).
Each case runs in a fresh process. Per case: median seconds per step after one warmup step,
and peak RSS during the steps minus RSS just before the first step (the loaded weights are not
counted; optimizer state, gradients and activations are). Ratios are against `full` of the same
model and dtype. Optionally, the held-out quality of a quickstart run's exits (--quickstart-run).

    .venv/bin/python scripts/bench/tune_cost.py [--steps N] [--out DIR] [--quick] [--quickstart-run DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from eetune.config import EetuneConfig, compose_config
from eetune.config.schema import to_container
from eetune.data import IGNORE_INDEX, TokenStream, TrainBatches, TuningData
from eetune.data.corpus import pack_examples
from eetune.models import BaseModel, fingerprint, get_model_entry, param_count
from eetune.models import hf_config as hfc
from eetune.models.load import materialise, parse_dtype
from eetune.models.tiny import random_decoder
from eetune.models import load_base_model
from eetune.data import load_tuning_data
from eetune.train.needs import build_model
from eetune.train.trainer import Trainer

from common import (
    DEFAULT_OUT_DIR,
    CaseFailed,
    PeakMemory,
    case_entry_point,
    current_rss_mib,
    machine_info,
    make_console,
    now_iso,
    print_table,
    release_free_memory,
    run_case_in_subprocess,
    write_json,
)

# From the issue: what 3 mlp exits with the shared head should cost, relative to full fine-tuning.
GOAL_TIME_RATIO = 0.5
GOAL_MEMORY_RATIO = 0.35
GOAL_KIND = "exits_shared"

WARMUP_STEPS = 1
SMOLLM2 = "smollm2_135m"
SCALED_LLAMA = "llama2_13b_scaled"
SCALE = 8  # Llama-2-13B's width, FFN, heads and vocab divided by this: dim 640, vocab 4000, ffn 1728
# 12 layers rather than 10: exits at exactly 1/4, 1/2, 3/4 (3/6/9), like the paper's 10/20/30 of
# 40, and a head share of the matmul work closer to the real model's (4% here, 1.3% real).
SCALED_LAYERS = 12
MODELS = (SMOLLM2, SCALED_LLAMA)
DTYPES = ("float32", "bfloat16")
KINDS = ("full", "exits_shared", "exits_copy")
KIND_LABELS = {"full": "full FT", "exits_shared": "exits, shared head", "exits_copy": "exits, copied heads"}
MODEL_LABELS = {SMOLLM2: "SmolLM2-135M", SCALED_LLAMA: f"Llama-2-13B shape / {SCALE} (random)"}
DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16"}
CASE_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Case:
    model: str
    dtype: str
    kind: str
    steps: int  # timed steps, after WARMUP_STEPS
    batch_size: int
    seq_len: int

    @property
    def label(self) -> str:
        return f"{self.model} {self.dtype} {self.kind}"


# --- the models -----------------------------------------------------------------------------------


def scaled_llama2_13b_config() -> dict[str, Any]:
    """Llama-2-13B's config.json with width, FFN, heads and vocab / SCALE (head_dim stays 128)."""
    ref = dict(get_model_entry("llama2_13b").reference_config)
    scaled = {key: int(ref[key]) // SCALE for key in
              ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "num_key_value_heads")}
    return {**ref, **scaled, "num_hidden_layers": SCALED_LAYERS}


def exit_layers(model: str) -> list[int]:
    if model == SMOLLM2:
        return [8, 16, 24]
    return [SCALED_LAYERS // 4, SCALED_LAYERS // 2, 3 * SCALED_LAYERS // 4]


def model_shape(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """Sizes that decide how much the vocabulary head weighs in a step."""
    family = get_model_entry(name).family
    vocab, dim = int(config["vocab_size"]), int(config["hidden_size"])
    total = param_count(family, config)
    head = vocab * dim
    # Per-token matmul work is ~2 x (layer weights + head); the embedding lookup is free.
    input_embedding = 0 if hfc.tie_word_embeddings(config) else vocab * dim
    matmul_params = total - input_embedding - dim  # minus the final norm's scale
    return {
        "layers": hfc.num_layers(config), "hidden_size": dim, "intermediate_size": int(config["intermediate_size"]),
        "vocab_size": vocab, "num_attention_heads": int(config["num_attention_heads"]),
        "num_key_value_heads": hfc.num_kv_heads(config), "tied_embeddings": hfc.tie_word_embeddings(config),
        "params": total, "head_params": head, "head_share_of_matmul_work": head / matmul_params,
    }


def models_info() -> dict[str, Any]:
    smollm2 = dict(get_model_entry(SMOLLM2).reference_config)
    llama13b = dict(get_model_entry("llama2_13b").reference_config)
    return {
        SMOLLM2: {"description": "SmolLM2-135M-Instruct (bundled), pydoc text batches",
                  "exit_layers": exit_layers(SMOLLM2), **model_shape(SMOLLM2, smollm2)},
        SCALED_LLAMA: {"description": f"random init, Llama-2-13B shape with width/FFN/heads/vocab / {SCALE}, "
                                      f"{SCALED_LAYERS} layers, random token ids",
                       "exit_layers": exit_layers(SCALED_LLAMA), **model_shape("llama2_13b", scaled_llama2_13b_config()),
                       "real_llama2_13b": model_shape("llama2_13b", llama13b)},
    }


# --- one case, in its own process --------------------------------------------------------------


def case_config(case: Case, run_dir: Path) -> EetuneConfig:
    overrides = [
        f"run_dir={run_dir}", f"model.dtype={case.dtype}",
        f"data.seq_len={case.seq_len}", f"data.batch_size={case.batch_size}",
        f"exits.layers=[{','.join(map(str, exit_layers(case.model)))}]",
        f"exits.head={'copy' if case.kind == 'exits_copy' else 'shared'}",
        f"train.steps={WARMUP_STEPS + case.steps}", "train.checkpoint_every=0",
    ]
    if case.model == SCALED_LLAMA:
        overrides += ["model=llama2_13b", "model.device=cpu", f"model.max_seq_len={case.seq_len}"]
    return compose_config("tune", overrides)


def load_smollm2(cfg: EetuneConfig) -> tuple[BaseModel, TuningData]:
    base = load_base_model(**vars(cfg.model))
    return base, load_tuning_data(cfg.data, base.tokenizer, max_seq_len=cfg.model.max_seq_len)


def build_scaled_llama(cfg: EetuneConfig, case: Case, run_dir: Path) -> tuple[BaseModel, TuningData]:
    """Random weights through the same `materialise` a real checkpoint goes through; random tokens."""
    config = scaled_llama2_13b_config()
    entry = get_model_entry("llama2_13b")
    weights = random_decoder(entry, config, seed=cfg.seed, max_seq_len=cfg.model.max_seq_len).state_dict()
    model = materialise(entry.family, config, weights, cfg.model.max_seq_len, parse_dtype(cfg.model.dtype),
                        torch.device("cpu"))
    del weights
    base = BaseModel(name=entry.name, model=model, tokenizer=None, checkpoint_dir=run_dir, hf_config=config,
                     fingerprint=fingerprint(model.state_dict()))
    # One fresh batch per step (as for SmolLM2), plus held-out windows the Trainer scores exits on.
    generator = torch.Generator().manual_seed(cfg.seed)
    num_examples = case.batch_size * (WARMUP_STEPS + case.steps)
    ids = torch.randint(0, int(config["vocab_size"]), (num_examples * case.seq_len + 1,), generator=generator)
    tokens, labels = pack_examples(TokenStream(ids, torch.ones_like(ids, dtype=torch.bool)), case.seq_len)
    heldout = torch.randint(0, int(config["vocab_size"]), (cfg.data.heldout_sequences * case.seq_len,),
                            generator=generator)
    data = TuningData(tokens, labels, TokenStream(heldout, torch.ones_like(heldout, dtype=torch.bool)),
                      case.seq_len, num_documents=0)
    return base, data


StepFn = Callable[[], float]  # one optimizer step; returns the loss


def full_finetune_step(cfg: EetuneConfig, base: BaseModel, data: TuningData) -> tuple[StepFn, int]:
    model = base.model
    model.requires_grad_(True)  # only in this case's own process: the base is frozen everywhere else
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # The same optimizer settings and batches as the Trainer: only what is trained differs.
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    batches = TrainBatches(data.train_tokens, data.train_labels, cfg.data.batch_size, shuffle=cfg.data.shuffle,
                           seed=cfg.seed)

    def step() -> float:
        batch = next(batches)
        logits = model(batch["tokens"])  # [B, S, V], fp32: torchtune upcasts the head's output
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                               ignore_index=IGNORE_INDEX)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, sum(p.numel() for p in params)


def exits_step(cfg: EetuneConfig, base: BaseModel, data: TuningData, run_dir: Path) -> tuple[StepFn, int]:
    torch.manual_seed(cfg.seed)  # as the tune stage does before building the exits
    model = build_model(cfg, base)
    trainer = Trainer(cfg, base, model, data, run_dir, Console(quiet=True))

    def step() -> float:
        metrics = trainer.train_step()
        trainer.step += 1  # as Trainer.fit does: loss-weight schedules read it
        return metrics["loss"]

    return step, sum(p.numel() for p in model.exit_parameters())


def run_one_case(raw: dict[str, Any]) -> dict[str, Any]:
    """Entry point of a case subprocess: build, then time and measure the steps."""
    case = Case(**raw)
    with tempfile.TemporaryDirectory(prefix="eetune-tune-cost-") as scratch:
        run_dir = Path(scratch)
        cfg = case_config(case, run_dir)
        if case.model == SMOLLM2:
            base, data = load_smollm2(cfg)
        else:
            base, data = build_scaled_llama(cfg, case, run_dir)
        release_free_memory()
        rss_loaded_mib = current_rss_mib()
        if case.kind == "full":
            step, trainable = full_finetune_step(cfg, base, data)
        else:
            step, trainable = exits_step(cfg, base, data, run_dir)

        seconds: list[float] = []
        losses: list[float] = []
        with PeakMemory() as memory:
            for _ in range(WARMUP_STEPS + case.steps):
                start = time.perf_counter()
                losses.append(step())
                seconds.append(time.perf_counter() - start)
    assert memory.window is not None
    timed = seconds[WARMUP_STEPS:]
    median = statistics.median(timed)
    tokens = case.batch_size * case.seq_len
    return {
        **asdict(case),
        "exit_layers": [] if case.kind == "full" else exit_layers(case.model),
        "trainable_params": trainable,
        "tokens_per_step": tokens,
        "warmup_seconds": seconds[:WARMUP_STEPS],
        "step_seconds": timed,
        "seconds_per_step_median": median,
        "tokens_per_s": tokens / median,
        "losses": losses,
        "memory": {
            "rss_loaded_mib": rss_loaded_mib,
            # What building the case added before its first step (exits' own weights; 0 for full).
            "new_weights_mib": memory.window.rss_before_mib - rss_loaded_mib,
            **memory.window.as_dict(),
        },
        "torch_threads": torch.get_num_threads(),
        "config": {key: to_container(getattr(cfg, key)) for key in ("loss", "optim", "exits")},
    }


# --- the parent: run every case, compare, report -------------------------------------------------


def run_cases(cases: list[Case], console: Console) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    progress = Progress(TextColumn("[bold]tune cost"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.description}"), TimeElapsedColumn(), console=console)
    with progress:
        task = progress.add_task("", total=len(cases))
        for case in cases:
            progress.update(task, description=case.label)
            try:
                results.append(run_case_in_subprocess(Path(__file__), asdict(case), timeout_s=CASE_TIMEOUT_S))
            except CaseFailed as exc:
                progress.console.print(f"[red]{exc}")
                results.append({**asdict(case), "error": str(exc)})
            progress.advance(task)
    return results


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Ratios of each case to full fine-tuning of the same model and dtype, and the goals."""
    full = {(r["model"], r["dtype"]): r for r in results if r["kind"] == "full" and "error" not in r}
    for result in results:
        reference = full.get((result["model"], result["dtype"]))
        if "error" in result or reference is None:
            continue
        mem, ref_mem = result["memory"], reference["memory"]
        ratios = {
            "time": _ratio(result["seconds_per_step_median"], reference["seconds_per_step_median"]),
            "peak_memory": _ratio(mem["peak_delta_mib"], ref_mem["peak_delta_mib"]),
            # Also counting the exits' own weights, which exist only because we tune exits.
            "peak_memory_incl_new_weights": _ratio(mem["peak_delta_mib"] + mem["new_weights_mib"],
                                                   ref_mem["peak_delta_mib"] + ref_mem["new_weights_mib"]),
        }
        result["ratios_vs_full"] = ratios
        if result["kind"] == GOAL_KIND:
            result["goals"] = {
                "time": {"max_ratio": GOAL_TIME_RATIO, "met": _within(ratios["time"], GOAL_TIME_RATIO)},
                "peak_memory": {"max_ratio": GOAL_MEMORY_RATIO, "met": _within(ratios["peak_memory"], GOAL_MEMORY_RATIO)},
            }


def _ratio(value: float, reference: float) -> float | None:
    return value / reference if reference > 0 else None


def _within(ratio: float | None, goal: float) -> bool | None:
    return None if ratio is None else ratio <= goal


def read_quickstart(run_dir: Path) -> dict[str, Any]:
    """The held-out CE/agreement per exit (and the final layer) a tune run wrote to its manifest."""
    path = run_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
        tune, final = manifest["tune"], int(manifest["base_model"]["num_layers"])
        heldout = tune["heldout"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--quickstart-run {run_dir}: no tune manifest with a tune.heldout block ({exc!r})") from None
    layers = [
        {"layer": int(layer), "final": int(layer) == final, **values}
        for layer, values in sorted(heldout.items(), key=lambda item: int(item[0]))
    ]
    return {"run_dir": str(run_dir.resolve()), "base_model": manifest["base_model"]["name"],
            "steps": tune.get("steps"), "tokens_seen": tune.get("tokens_seen"), "layers": layers}


def _ratio_cell(ratio: float | None, goal: float | None) -> str:
    if ratio is None:
        return "-"
    if goal is None:
        return f"{ratio:.2f}x"
    return f"{ratio:.2f}x " + ("[green]✓[/]" if ratio <= goal else "[red]✗[/]")


def print_cost_tables(console: Console, results: list[dict[str, Any]], settings: dict[str, Any],
                      models: dict[str, Any]) -> None:
    """One table per model: the cases side by side, ratios against its full fine-tune."""
    for model in MODELS:
        rows = []
        for r in (r for r in results if r["model"] == model):
            label = [DTYPE_LABELS[r["dtype"]], KIND_LABELS[r["kind"]]]
            if "error" in r:
                rows.append([*label, "failed", "-", "-", "-", "-", "-"])
                continue
            ratios, mem = r.get("ratios_vs_full", {}), r["memory"]
            goal = r["kind"] == GOAL_KIND
            rows.append([
                *label,
                f"{r['trainable_params'] / 1e6:.1f}M",
                f"{r['seconds_per_step_median']:.2f}",
                _ratio_cell(ratios.get("time"), GOAL_TIME_RATIO if goal else None),
                f"{mem['peak_delta_mib']:.0f}",
                _ratio_cell(ratios.get("peak_memory"), GOAL_MEMORY_RATIO if goal else None),
                f"{mem['new_weights_mib']:.0f}",
            ])
        shape = models[model]
        print_table(
            console,
            f"{MODEL_LABELS[model]}: head = {shape['head_share_of_matmul_work']:.0%} of the matmul work",
            ["dtype", "case", "trained", "s/step", "time/full", "peak MiB", "peak/full", "exit MiB"],
            rows, left_columns=2,
        )
    console.print(
        f"{settings['batch_size']} x {settings['seq_len']} tokens per step, median of {settings['steps']} step(s) "
        f"after {WARMUP_STEPS} warmup. peak = peak RSS during the steps minus RSS just before the first; "
        "exit MiB = RSS the exits' own weights took before that (not in peak). Exits: 3 mlp exits. "
        f"Goals for {KIND_LABELS[GOAL_KIND]}: time <= {GOAL_TIME_RATIO:.2f}x, "
        f"peak <= {GOAL_MEMORY_RATIO:.2f}x of full fine-tuning (✓ met, ✗ missed)."
    )


def print_quickstart_table(console: Console, quickstart: dict[str, Any]) -> None:
    rows = [
        [f"{q['layer']} (final)" if q["final"] else str(q["layer"]),
         f"{q['cross_entropy_before']:.3f}", f"{q['cross_entropy_after']:.3f}",
         f"{q['agreement_before']:.1%}", f"{q['agreement_after']:.1%}"]
        for q in quickstart["layers"]
    ]
    print_table(
        console, f"held-out quality: {quickstart['base_model']}, {quickstart['steps']} steps",
        ["layer", "CE before", "CE after", "agreement before", "agreement after"], rows,
        caption=f"from {quickstart['run_dir']}/manifest.json",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per case after 1 warmup step (default 3; 1 with --quick)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help=f"output dir (default {DEFAULT_OUT_DIR})")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 step of 1 x 128 tokens per case")
    parser.add_argument("--quickstart-run", type=Path, default=None,
                        help="a tune run dir whose manifest's held-out CE per exit is reported too")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = make_console()
    # Read the quickstart run first: a wrong path fails before minutes of benchmarking.
    quickstart = read_quickstart(args.quickstart_run) if args.quickstart_run else None
    settings = {
        "steps": args.steps or (1 if args.quick else 3),
        "warmup_steps": WARMUP_STEPS,
        "batch_size": 1 if args.quick else 4,
        "seq_len": 128 if args.quick else 256,
        "quick": args.quick,
    }
    cases = [
        Case(model, dtype, kind, settings["steps"], settings["batch_size"], settings["seq_len"])
        for model in MODELS for dtype in DTYPES for kind in KINDS
    ]
    machine = machine_info()
    console.print(f"[bold]tune cost[/]: {len(cases)} cases, each in a fresh process; torch {machine['torch']}, "
                  f"{machine['torch_threads']} threads, {machine['cpus_usable']} CPUs, "
                  f"load average {machine['load_average_1_5_15min'][0]:.1f}")
    started = time.perf_counter()
    results = run_cases(cases, console)
    add_ratios(results)

    report = {
        "benchmark": "tune_cost",
        "created": now_iso(),
        "wall_seconds": time.perf_counter() - started,
        "settings": settings,
        "loss": "exits: the recipe's default loss (CE to the data's next token) through the fused, chunked "
                "head + loss; full: F.cross_entropy over the full logits",
        "goals": {"case": GOAL_KIND, "time_ratio_max": GOAL_TIME_RATIO, "peak_memory_ratio_max": GOAL_MEMORY_RATIO},
        "machine": machine,
        "load_average_after": list(os.getloadavg()),
        "models": models_info(),
        "cases": results,
        "quickstart": quickstart,
    }
    path = write_json(args.out / "tune_cost.json", report)
    print_cost_tables(console, results, settings, report["models"])
    if quickstart is not None:
        print_quickstart_table(console, quickstart)
    bad_losses = [f"{r['model']} {r['dtype']} {r['kind']}"
                  for r in results if "losses" in r and not all(math.isfinite(x) for x in r["losses"])]
    if bad_losses:
        console.print(f"[yellow]non-finite loss in: {', '.join(bad_losses)}")
    console.print(f"wrote {path}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    if case_entry_point(run_one_case):
        sys.exit(0)
    sys.exit(main())
