"""Does more tuning keep paying? Held-out agreement against tokens seen, tune runs side by side.

Reads each run's own `metrics.jsonl` (its held-out evaluations) and `config.yaml`, so it runs in
seconds after the tunes: e.g. the same recipe on a small corpus for several epochs against a
larger one seen once. Runs compared this way should share their held-out windows (the first
evaluation's numbers then match exactly, which the table's step-0 row shows).

    .venv/bin/python scripts/bench/tuning_curves.py --run "895k tokens x 2.6 epochs=runs/long/tune" \
        --run "3M tokens, once=runs/builtin/tune" [--out runs/bench/tuning_curves]

Writes tuning_curves.json (every held-out evaluation of every run), a table of agreement (CE) per
exit at each run's evaluations, and tuning_curves.png (agreement against tokens seen, a panel per exit).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_OUT_DIR, machine_info, make_console, now_iso, plot_per_exit, print_table, write_json  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

from eetune.eval.report import md_table  # noqa: E402
from eetune.rundir import resolve_run_dir  # noqa: E402
from eetune.train.metrics import read_metrics  # noqa: E402

AGREEMENT = "heldout_agreement/exit_"
CROSS_ENTROPY = "heldout_ce/exit_"


def tokens_per_step(run_dir: Path) -> int:
    """Training tokens per optimiser step, from the run's recorded config."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    return int(cfg.data.batch_size) * int(cfg.data.seq_len) * int(cfg.optim.grad_accum)


def heldout_curve(run_dir: Path) -> list[dict]:
    """One point per held-out evaluation (a step's last record wins: the final one repeats it)."""
    per_step: dict[int, dict] = {}
    for record in read_metrics(run_dir / "metrics.jsonl"):
        layers = {key.removeprefix(AGREEMENT) for key in record if key.startswith(AGREEMENT)}
        if layers:
            per_step[record["step"]] = {
                "step": record["step"],
                "agreement": {layer: record[AGREEMENT + layer] for layer in sorted(layers, key=int)},
                "cross_entropy": {layer: record[CROSS_ENTROPY + layer] for layer in sorted(layers, key=int)},
            }
    return [per_step[step] for step in sorted(per_step)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=RUN_DIR",
                        help="a tune run (or builtin:<name>) and its label; give two or more")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR / "tuning_curves")
    args = parser.parse_args(argv)

    runs = []
    for spec in args.run:
        label, sep, path = spec.rpartition("=")
        if not sep or not label:
            parser.error(f"--run {spec!r}: write it as LABEL=RUN_DIR")
        run_dir = Path(resolve_run_dir(path))
        if not (run_dir / "metrics.jsonl").is_file():
            parser.error(f"--run {spec!r}: {run_dir} has no metrics.jsonl (is it a tune run?)")
        per_step = tokens_per_step(run_dir)
        curve = heldout_curve(run_dir)
        for point in curve:
            point["tokens_seen"] = point["step"] * per_step
        runs.append({"label": label, "run_dir": str(run_dir), "tokens_per_step": per_step, "curve": curve})

    final_layer = max(int(layer) for run in runs for point in run["curve"] for layer in point["agreement"])
    layers = sorted({layer for run in runs for point in run["curve"] for layer in point["agreement"]
                     if int(layer) != final_layer}, key=int)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "tuning_curves.json", {
        "benchmark": "tuning_curves", "created": now_iso(), "machine": machine_info(), "runs": runs,
    })

    def cell(point: dict, layer: str) -> str:
        if layer not in point["agreement"]:
            return "-"
        return f"{point['agreement'][layer]:.1%} ({point['cross_entropy'][layer]:.2f})"

    rows = [[run["label"], str(point["step"]), f"{point['tokens_seen'] / 1e6:.2f}M",
             *(cell(point, layer) for layer in layers)]
            for run in runs for point in run["curve"]]
    header = ["run", "step", "tokens seen", *(f"exit {layer}" for layer in layers)]
    console = make_console()
    print_table(console, "Held-out top-1 agreement with the final layer (CE)", header, rows, left_columns=1)
    (args.out / "tuning_curves.md").write_text(md_table(header, rows) + "\n")

    def agreement_of(run: dict):
        return lambda layer: [(p["tokens_seen"] / 1e6, 100 * p["agreement"][layer])
                              for p in run["curve"] if layer in p["agreement"]]

    plot_per_exit(args.out / "tuning_curves.png", layers, [(run["label"], agreement_of(run)) for run in runs],
                  xlabel="tokens seen (M)", ylabel="held-out agreement (%)")
    console.print(f"wrote {args.out}/tuning_curves.json, tuning_curves.md and tuning_curves.png")


if __name__ == "__main__":
    main()
