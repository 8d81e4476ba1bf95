"""Which exits pay on held-out chat? The recipe choices side by side, the same tokens for each.

Every variant is a real `eetune tune` run of the `smollm2_135m_chat` recipe (exits augmented
fresh, same seed, same batches, `train.steps` each, no early stop) on the self-distilled chat
corpus, scored on the recipe's held-out prompts (held out by prompt: questions the exits never
saw). Variants: exit architecture (`mlp`, `layer`, `norm`), copy vs random init, the loss (CE
to the final layer's argmax, KL to its distribution, the recipe's mix), exit depths
(8/16/24 vs 4/8/.../24), and the learning rate. Variants with the same exit layers share one hidden-state cache
(`data.cache_dir`), so the backbone runs once per layer set.

Per variant: held-out CE and top-1 agreement with the final layer at each exit, the curve
against tokens seen, and what an exit costs at decode time (its module's time in layers, from
eval's cost model). Writes exit_study.json, a table, and exit_study.png (agreement against
tokens seen, one panel per exit). Finished variants (at the same --steps) are read back and
reported, so a stopped study goes on, and `--only` adds variants to the report:

    .venv/bin/python scripts/bench/exit_study.py --data runs/study/chat.jsonl [--steps 50] [--only 1,2]

`--data` defaults to the corpus parts the study ran on (000-004 of scripts/corpus/smollm2_chat/),
restored once into runs/study/chat.jsonl.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "corpus"))
from common import (  # noqa: E402
    DEFAULT_OUT_DIR, machine_info, make_console, now_iso, plot_per_exit, print_table, write_json,
)
from parts import restore as restore_corpus  # noqa: E402

from eetune.config import compose_config  # noqa: E402
from eetune.stages import tune  # noqa: E402
from eetune.train.metrics import read_metrics  # noqa: E402
from eetune.train.results import result_from_run_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PARTS = ROOT / "scripts" / "corpus" / "smollm2_chat"
STUDY_PARTS = 5  # parts 000-004: the 895,001 answer tokens every variant saw
RECIPE = "smollm2_135m_chat"
DEEP = "[4,8,12,16,20,24]"

# The study's baseline, whatever the recipe now says: mlp exits at 8/16/24 copied from the last
# layer (norms at identity), CE to the final argmax + 0.5 KL, lr 1e-3 (the recipe before the study).
BASELINE = ["exits.init=copy", "exits.norm_init=ones", "loss.kd_alpha=0.5", "optim.lr=1e-3"]

# name -> overrides on top of the baseline.
VARIANTS: dict[str, list[str]] = {
    "mlp, copy, CE + 0.5 KL (baseline)": [],
    "layer, copy": ["exits=layer"],
    "norm, copy": ["exits=norm"],
    "mlp, random init": ["exits.init=random"],
    "mlp, CE to final argmax only": ["loss.kd_alpha=0"],
    "mlp, KL to final only": ["loss.kd_alpha=1"],
    "mlp at 4/8/12/16/20/24": [f"exits.layers={DEEP}"],
    "mlp, random init, lr 3e-3": ["exits.init=random", "optim.lr=3e-3"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="chat JSONL (default: the committed parts)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--only", default=None, help="comma-separated variant numbers (1-based) to run")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every variant")
    args = parser.parse_args()
    console = make_console()
    data = args.data or ROOT / "runs" / "study" / "chat.jsonl"
    if args.data is None and not data.exists():
        restore_corpus(data, PARTS, first=STUDY_PARTS)
    work = args.out / "exit_study_runs"
    chosen = None if args.only is None else {int(x) - 1 for x in args.only.split(",")}
    common = [
        f"recipe={RECIPE}", f"data.path={data}", f"train.steps={args.steps}",
        f"train.eval_every={max(args.steps // 4, 1)}", "train.checkpoint_every=0", "train.flat_patience=0",
        "train.init_from=null", *BASELINE, *args.set,
    ]
    results = []
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        run_dir = work / str(i)
        finished = (run_dir / "manifest.json").is_file() and result_from_run_dir(run_dir).steps == args.steps
        if not finished and chosen is not None and i not in chosen:
            continue  # the report holds every finished variant, run now or before
        layer_set = "deep" if any(o.startswith("exits.layers=") for o in overrides) else "default"
        cache = work / f"cache_{layer_set}"
        if not finished:
            console.print(f"[bold]{i + 1}/{len(VARIANTS)}[/] {name}")
            shutil.rmtree(run_dir, ignore_errors=True)  # a variant stopped half-way starts again
            cfg = compose_config("tune", [*common, f"run_dir={run_dir}", f"data.cache_dir={cache}", *overrides])
            tune.run(cfg, console=console)
        result = result_from_run_dir(run_dir)
        results.append({
            "variant": name, "overrides": overrides, "run_dir": str(run_dir),
            "seconds": tune_seconds(run_dir), "tokens_seen": result.tokens_seen,
            "after": {str(layer): {"cross_entropy": q.cross_entropy, "agreement": q.agreement}
                      for layer, q in result.after.items()},
            "exit_cost_layers": exit_costs(run_dir),
            "curve": [
                {"step": r["step"], **{k: v for k, v in r.items() if k.startswith("heldout_")}}
                for r in read_metrics(run_dir / "metrics.jsonl") if any(k.startswith("heldout_ce/") for k in r)
            ],
        })
    report = {
        "benchmark": "exit_study", "created": now_iso(), "recipe": RECIPE, "steps": args.steps,
        "data": {"path": str(data), "sha256": file_sha256(data)}, "overrides": args.set,
        "machine": machine_info(), "results": results,
    }
    write_json(args.out / "exit_study.json", report)
    layers = sorted({int(l) for r in results for l in r["after"]} - {max(int(l) for r in results for l in r["after"])})
    rows = [
        [r["variant"],
         *(f"{r['after'][str(l)]['agreement']:.1%}" if str(l) in r["after"] else "" for l in layers),
         *(f"{r['after'][str(l)]['cross_entropy']:.2f}" if str(l) in r["after"] else "" for l in (8, 16, 24)),
         f"{statistics.median(r['exit_cost_layers'].values()):.2f}", f"{r['seconds']:.0f}"]
        for r in results
    ]
    print_table(
        console,
        f"held-out chat after {args.steps} steps ({results[0]['tokens_seen']:,} tokens each; SmolLM2-135M as "
        "embedded): top-1 agreement with the final layer, CE, an exit module's cost in layers (median over exits)",
        ["variant", *(f"agree {l}" for l in layers), "CE 8", "CE 16", "CE 24", "exit cost", "s"], rows,
    )
    plot(results, layers, args.out / "exit_study.png")
    console.print(f"wrote {args.out / 'exit_study.json'} and {args.out / 'exit_study.png'}")


def tune_seconds(run_dir: Path) -> float:
    """Wall time of the tune, from its config (written at the start) to its manifest (at the end)."""
    return (run_dir / "manifest.json").stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@functools.cache
def recipe_base_model():
    """The recipe's base model, loaded once for every variant's exits (they never change it)."""
    from eetune.models import load_base_model

    return load_base_model(**vars(compose_config("tune", [f"recipe={RECIPE}"]).model))


def exit_costs(run_dir: Path) -> dict[str, float]:
    """Each exit module's decode-time cost in backbone layers (eval's cost model, batch 1)."""
    from eetune.eval.timing import measure_costs
    from eetune.exits import load_exits

    base = recipe_base_model()
    model = load_exits(run_dir, base.model, base.fingerprint, base.checkpoint_dir)
    measure_costs(model, repeats=10)  # warm-up: the first model measured in a process came out ~2x slow
    costs = measure_costs(model, repeats=50)
    return {str(layer): seconds / costs.layer_s for layer, seconds in costs.exit_s.items()}


def plot(results: list[dict], layers: list[int], out: Path) -> None:
    def agreement_curve(r: dict):
        per_step = r["tokens_seen"] / max(r["curve"][-1]["step"], 1) / 1e3
        return lambda layer: [(c["step"] * per_step, c[f"heldout_agreement/exit_{layer}"])
                              for c in r["curve"] if f"heldout_agreement/exit_{layer}" in c]

    plot_per_exit(out, layers, [(r["variant"], agreement_curve(r)) for r in results], xlabel="tokens seen (k)",
                  ylabel="held-out top-1 agreement with the final layer", legend_size=6)


if __name__ == "__main__":
    main()
