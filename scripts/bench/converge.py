"""Which tuning choices make SmolLM2's exits converge fastest? Side by side, same budget.

Each variant is a real `eetune tune` run (quickstart recipe + overrides) for the same number
of steps on the same batches; we compare held-out CE and top-1 agreement with the final
layer per exit at the end, and plot held-out CE against step.

    .venv/bin/python scripts/bench/converge.py [--steps 40] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_OUT_DIR, machine_info, make_console, now_iso, print_table, write_json  # noqa: E402

from eetune.config import compose_config  # noqa: E402
from eetune.rundir import atomic_write  # noqa: E402
from eetune.train import loop  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--only", default=None, help="comma-separated variant numbers (1-based) to run")
    args = parser.parse_args()
    console = make_console()
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
                f"train.eval_every={max(args.steps // 4, 1)}", "train.checkpoint_every=0", *overrides,
            ],
        )
        start = time.perf_counter()
        result = loop.run(cfg, console=console)
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
        console, f"held-out quality after {args.steps} steps (SmolLM2-135M, 4x256 tokens/step, bf16)",
        ["variant", *(f"CE {l}" for l in layers), *(f"agree {l}" for l in layers), "s"], rows,
    )
    _plot(results, layers, args.out / "converge.png")
    console.print(f"wrote {args.out / 'converge.json'} and {args.out / 'converge.png'}")


def _plot(results: list[dict], layers: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.6), sharey=True)
    for ax, layer in zip(axes, layers):
        for r in results:
            points = [(c["step"], c[f"heldout_ce/exit_{layer}"]) for c in r["curve"]]
            ax.plot(*zip(*points), marker="o", label=r["variant"])
        ax.set_title(f"exit {layer}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out CE (nats/token)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


if __name__ == "__main__":
    main()
