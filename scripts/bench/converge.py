"""Which tuning choices make SmolLM2's exits converge fastest? Side by side, same budget.

Each variant is a real `eetune tune` run (quickstart recipe + overrides) for the same number
of steps on the same batches; we compare held-out CE and top-1 agreement with the final
layer per exit at the end, and plot held-out CE against step.

    .venv/bin/python scripts/bench/converge.py [--steps 40] [--out runs/bench]

`--weights` runs the loss-weighting study instead: the same steps with exit weights 0.1, 1
and 10, per-exit 0.1/1/10, linear and cosine warm-up, `dynamic`, and half the lr as a
yardstick; it reports how far each variant's tuned exit weights end from the `w_i = 1` run's
(mean and max abs difference over every exit parameter) and the held-out CE per exit. The backbone is
frozen and exits share no trainable parameter, so a constant w_i only scales exit i's
gradients, which AdamW's per-parameter normalisation divides out again; gradient clipping
(global norm) and AdamW's eps are what still see it, hence the `no clip` pair.

    .venv/bin/python scripts/bench/converge.py --weights --steps 10 --set model.dtype=float32 data.batch_size=2 data.seq_len=128
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DEFAULT_OUT_DIR, machine_info, make_console, now_iso, plot_per_exit, print_table, write_json,
)

from eetune.config import compose_config  # noqa: E402
from eetune.stages import tune  # noqa: E402
from eetune.train.metrics import read_metrics  # noqa: E402

# name -> overrides on top of the quickstart recipe (CE to the final layer's argmax, copy init);
# every variant names its lr so the table reads alone whatever the recipe's default.
VARIANTS: dict[str, list[str]] = {
    "LM loss (data labels), lr 1e-3": ["loss.ce_target=labels", "optim.lr=1e-3"],
    "CE to final argmax, lr 1e-3": ["optim.lr=1e-3"],
    "KL to final distribution, lr 1e-3": ["loss.ce_target=labels", "loss.kd_alpha=1.0", "optim.lr=1e-3"],
    "CE to final argmax, lr 3e-3": ["optim.lr=3e-3"],
    "CE + 0.5 KL, lr 3e-3": ["optim.lr=3e-3", "loss.kd_alpha=0.5"],
    "CE to final argmax, random init, lr 1e-3": ["exits.init=random", "optim.lr=1e-3"],
    "CE to final argmax, random init, lr 3e-3": ["exits.init=random", "optim.lr=3e-3"],
    "CE to final argmax, norms at identity, lr 3e-3": ["exits.norm_init=ones", "optim.lr=3e-3"],
}

# --weights: name -> (overrides, the variant its tuned weights are compared with). The recipe's lr is 3e-3.
WEIGHT_VARIANTS: dict[str, tuple[list[str], str]] = {
    "w_i = 1": (["loss.exit_weights=[1,1,1]"], "w_i = 1"),
    "w_i = 0.1": (["loss.exit_weights=[0.1,0.1,0.1]"], "w_i = 1"),
    "w_i = 10": (["loss.exit_weights=[10,10,10]"], "w_i = 1"),
    "w_i = 0.1 / 1 / 10": (["loss.exit_weights=[0.1,1,10]"], "w_i = 1"),
    "linear warm-up of w_i": (["loss.weighting=linear", "loss.warmup_steps={steps}"], "w_i = 1"),
    "cosine warm-up of w_i": (["loss.weighting=cosine", "loss.warmup_steps={steps}"], "w_i = 1"),
    "dynamic (token-wise)": (["loss.weighting=dynamic"], "w_i = 1"),
    "w_i = 1, lr halved": (["optim.lr=1.5e-3"], "w_i = 1"),
    "w_i = 1, no clip": (["optim.grad_clip=0"], "w_i = 1, no clip"),
    "w_i = 10, no clip": (["loss.exit_weights=[10,10,10]", "optim.grad_clip=0"], "w_i = 1, no clip"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--only", default=None, help="comma-separated variant numbers (1-based) to run")
    parser.add_argument("--weights", action="store_true", help="the loss-weighting study (see above) instead")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every variant")
    args = parser.parse_args()
    console = make_console()
    if args.weights:
        weights_study(args, console)
        return
    work = args.out / "converge_runs"
    shutil.rmtree(work, ignore_errors=True)

    results = []
    chosen = None if args.only is None else {int(x) - 1 for x in args.only.split(",")}
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        if chosen is not None and i not in chosen:
            continue
        console.print(f"[bold]{i + 1}/{len(VARIANTS)}[/] {name}")
        cfg = compose_config(
            "tune",
            [
                "recipe=smollm2_135m_quickstart", f"run_dir={work / str(i)}", f"train.steps={args.steps}",
                f"train.eval_every={max(args.steps // 4, 1)}", "train.checkpoint_every=0", *args.set, *overrides,
            ],
        )
        start = time.perf_counter()
        result = tune.run(cfg, console=console)
        curve = [
            {"step": r["step"], **{k: v for k, v in r.items() if k.startswith("heldout_")}}
            for r in read_metrics(work / str(i) / "metrics.jsonl")
            if any(k.startswith("heldout_ce/") for k in r)
        ]
        results.append(
            {
                "variant": name,
                "overrides": overrides,
                "seconds": time.perf_counter() - start,
                "after": {
                    str(layer): {"cross_entropy": q.cross_entropy, "agreement": q.agreement}
                    for layer, q in result.after.items()
                },
                "curve": curve,
            }
        )

    layers = [layer for layer in results[0]["after"] if layer != "30"]
    report = {
        "benchmark": "converge",
        "created": now_iso(),
        "steps": args.steps,
        "recipe": "smollm2_135m_quickstart",
        "machine": machine_info(),
        "results": results,
    }
    write_json(args.out / "converge.json", report)
    rows = [
        [r["variant"], *(f"{r['after'][l]['cross_entropy']:.2f}" for l in layers),
         *(f"{r['after'][l]['agreement']:.1%}" for l in layers), f"{r['seconds']:.0f}"]
        for r in results
    ]
    print_table(
        console,
        f"held-out quality after {args.steps} steps (SmolLM2-135M as embedded: Q4_1 GGUF dequantised; "
        "4x256 tokens/step, bf16)",
        ["variant", *(f"CE {l}" for l in layers), *(f"agree {l}" for l in layers), "s"], rows,
    )
    _plot(results, layers, args.out / "converge.png")
    console.print(f"wrote {args.out / 'converge.json'} and {args.out / 'converge.png'}")


def weights_study(args: argparse.Namespace, console) -> None:
    """Same steps and batches per variant; how far apart the tuned exits end, and their held-out CE."""
    from safetensors.torch import load_file

    work = args.out / "converge_weights_runs"
    shutil.rmtree(work, ignore_errors=True)
    results: dict[str, dict] = {}
    for i, (name, (overrides, _)) in enumerate(WEIGHT_VARIANTS.items()):
        overrides = [o.format(steps=args.steps) for o in overrides]
        console.print(f"[bold]{i + 1}/{len(WEIGHT_VARIANTS)}[/] {name}")
        cfg = compose_config("tune", [
            "recipe=smollm2_135m_quickstart", f"run_dir={work / str(i)}", f"train.steps={args.steps}",
            "train.checkpoint_every=0", *args.set, *overrides,
        ])
        start = time.perf_counter()
        result = tune.run(cfg, console=console)
        results[name] = {
            "overrides": overrides, "seconds": time.perf_counter() - start, "run_dir": str(work / str(i)),
            "after": {str(l): {"cross_entropy": q.cross_entropy, "agreement": q.agreement} for l, q in result.after.items()},
        }
    tensors = {name: load_file(str(Path(r["run_dir"]) / "exits.safetensors")) for name, r in results.items()}
    for name, r in results.items():
        ref = WEIGHT_VARIANTS[name][1]
        r["compared_with"] = ref
        diffs = [(tensors[name][k].float() - tensors[ref][k].float()).abs() for k in tensors[ref]]
        r["max_abs_diff"] = max(float(d.max()) for d in diffs)
        r["mean_abs_diff"] = sum(float(d.sum()) for d in diffs) / sum(d.numel() for d in diffs)
    layers = [l for l in next(iter(results.values()))["after"] if l != "30"]
    report = {
        "benchmark": "converge_weights", "created": now_iso(), "steps": args.steps, "overrides": args.set,
        "recipe": "smollm2_135m_quickstart", "machine": machine_info(), "results": results,
    }
    write_json(args.out / "converge_weights.json", report)
    rows = [
        [name, r["compared_with"], f"{r['mean_abs_diff']:.1e}", f"{r['max_abs_diff']:.1e}",
         *(f"{r['after'][l]['cross_entropy']:.3f}" for l in layers),
         f"{r['seconds']:.0f}"]
        for name, r in results.items()
    ]
    print_table(
        console,
        f"loss weighting after {args.steps} steps (SmolLM2-135M as embedded: Q4_1 GGUF dequantised; "
        f"quickstart recipe {' '.join(args.set)})",
        ["variant", "compared with", "mean |dW|", "max |dW|", *(f"CE {l}" for l in layers), "s"], rows, left_columns=2,
    )
    console.print(f"wrote {args.out / 'converge_weights.json'}")


def _plot(results: list[dict], layers: list[str], out: Path) -> None:
    def ce_curve(r: dict):
        return lambda layer: [(c["step"], c[f"heldout_ce/exit_{layer}"]) for c in r["curve"]]

    plot_per_exit(out, layers, [(r["variant"], ce_curve(r)) for r in results], xlabel="step",
                  ylabel="held-out CE (nats/token)")


if __name__ == "__main__":
    main()
