"""Which confidence policy buys the most speed at a given agreement? Teacher-forced, one run, one process.

Lever 3 of "exits that pay": a confidence check costs time at every exit a token passes. `max_prob`
runs the exit's whole vocabulary head there (on SmolLM2 one head costs ~4 layers); `learned` runs a
tiny estimator and the head only where the token leaves. A third candidate, measured here before
it is built: `max_prob` over a frequent-token head (the head's rows for the N most frequent tokens,
FR-Spec's draft vocabulary, softmax over those N only), with the whole head run only for the token
that leaves, so its token is the exit's own argmax.

On a run's recorded held-out sequences (`heldout.safetensors`: self-distilled chat held out by
prompt, for the builtin exits), every exit's confidence under each policy is computed for every
position, and each threshold's exits are chosen exactly as the engine chooses them
(`first_confident`). Agreement: the chosen exit's top-1 equals the final layer's. Speed: eval's
cost model (`measure_costs`: one layer, one head, each exit module and estimator at batch 1, on
this machine), plus a measured frequent-token head per N, and the catch-up of skipped layers
(the held-out tokens replayed in order: a layer that carries pending positions costs what a
layer over that many positions was timed at). Per policy, the frontier is the best
modelled speedup at each agreement floor; the oracle (the shallowest agreeing exit) bounds them all.
`what_if`: the oracle these costs would give exits that agreed more (how good must exits get?).
Per-exit thresholds (one per exit, searched over a grid) are set beside one global threshold: do
they buy enough to be worth a setting?

    .venv/bin/python scripts/bench/confidence_frontier.py [--run-dir builtin:smollm2_135m] [--vocab 1024,4096,16384] [--dtype bfloat16]

Writes confidence_frontier.json and confidence_frontier.png (agreement against modelled speedup).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_OUT_DIR, machine_info, make_console, now_iso, print_table, write_json  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

FLOORS = (0.95, 0.90, 0.85, 0.80)
THRESHOLDS = [round(0.02 * i, 2) for i in range(1, 50)] + [0.985, 0.99, 0.995, 0.999]


def frequent_confidence(hidden: torch.Tensor, head: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Max softmax probability over the head's rows for the `kept` token ids only."""
    logits = F.linear(hidden, head[kept]).float()
    return (logits.amax(-1) - logits.logsumexp(-1)).exp()


def frontier(confidence: torch.Tensor, top1: torch.Tensor, final_top1: torch.Tensor, costs: Any,
             exits: list[int], num_layers: int, policy: str) -> list[dict[str, float]]:
    """(threshold, agreement, speedup) for every threshold; confidence [E, T], top1 [E + 1, T];
    speedups from `costs` (eval's Costs) for `policy`, the catch-up charged in token order."""
    from eetune.eval.metrics import chosen, exit_fractions
    from eetune.infer.policy import first_confident

    points = []
    for t in THRESHOLDS:
        index = first_confident(confidence, t)
        fractions = exit_fractions(index, confidence.shape[0])
        points.append({"threshold": t, "agreement": float((chosen(top1, index) == final_top1).float().mean()),
                       "speedup": costs.sequence_speedup(index.tolist(), exits, num_layers, policy),
                       "fractions": fractions})
    return points


PER_EXIT_GRID = [0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0]


def per_exit_frontier(confidence: torch.Tensor, top1: torch.Tensor, costs: Any,
                      exits: list[int], num_layers: int, policy: str) -> list[dict[str, Any]]:
    """(thresholds, agreement, speedup) for every combination of one threshold per exit from
    PER_EXIT_GRID (1.0: that exit is never checked, as the engine does); eval's own search
    (eetune.eval.per_exit) measures each one."""
    import itertools

    from eetune.eval.per_exit import PerExitSearch

    search = PerExitSearch(confidence, top1, costs, exits, num_layers, policy)
    points = []
    for combo in itertools.product(PER_EXIT_GRID, repeat=len(exits)):
        point = search.point(combo)
        points.append({"thresholds": list(combo), "agreement": point.agreement, "speedup": point.speedup})
    return points


# Hypothetical agreement at each exit (nested: a token right at a shallow exit is right deeper).
WHAT_IF = ((0.4, 0.5, 0.65), (0.5, 0.6, 0.75), (0.6, 0.7, 0.85), (0.75, 0.85, 0.95))


def what_if(costs: Any, exits: list[int], num_layers: int, tokens: int = 20000, seed: int = 0) -> list[dict[str, Any]]:
    """The oracle bound these costs would give exits agreeing that often (WHAT_IF, one agreement
    per exit, for the first three exits): tokens drawn independently, the catch-up charged in order."""
    import random

    rng = random.Random(seed)
    rows = []
    for agreement in WHAT_IF:
        levels = list(agreement[: len(exits)])
        index = [next((k for k, a in enumerate(levels) if u < a), len(exits))
                 for u in (rng.random() for _ in range(tokens))]
        fractions = [index.count(k) / tokens for k in range(len(exits) + 1)]
        rows.append({"agreement": levels,
                     "oracle": costs.sequence_speedup(index, exits, num_layers, "oracle"),
                     "oracle_without_catch_up": costs.speedup(fractions, exits, num_layers, "oracle")})
    return rows


def best_at(points: list[dict[str, float]], floor: float) -> dict[str, float] | None:
    fine = [p for p in points if p["agreement"] >= floor]
    return max(fine, key=lambda p: p["speedup"]) if fine else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="builtin:smollm2_135m", help="a run dir with heldout.safetensors")
    parser.add_argument("--vocab", default="1024,4096,16384", help="frequent-token head sizes to try")
    parser.add_argument("--repeats", type=int, default=30, help="timing repeats per piece")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (decoding at batch 1)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the model's dtype: its agreement and every timing")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from safetensors.torch import load_file

    from eetune.eval.heldout import token_stats
    from eetune.eval.metrics import chosen, exit_fractions, oracle_exit
    from eetune.eval.timing import measure_costs, median_seconds
    from eetune.exits.loading import load_model
    from eetune.infer.draft_vocab import load_token_order
    from eetune.rundir import resolve_run_dir

    console = make_console()
    run_dir = Path(resolve_run_dir(args.run_dir))
    base, model = load_model(str(run_dir), name="smollm2_135m", dtype=args.dtype)
    order = load_token_order(run_dir)
    if order is None:
        raise SystemExit(f"{run_dir} has no draft_vocab.safetensors (token frequencies)")
    tokens = load_file(str(run_dir / "heldout.safetensors"))["tokens"]
    exits, num_layers = model.exit_layers, model.num_layers
    console.print(f"{len(tokens)} held-out sequences x {tokens.shape[1] - 1} predicted tokens; exits {exits}")

    with torch.inference_mode():
        stats = token_stats(model, tokens)
        # The exits' normalised hidden states, the very rows their heads read (as token_stats does).
        hidden = {}
        for row in tokens:
            states = model.hidden_states(row[None, :-1], exits)
            for layer in exits:
                hidden.setdefault(layer, []).append(model.exit_hidden(layer, states[layer])[0])
        hidden = {layer: torch.cat(rows) for layer, rows in hidden.items()}
        costs = measure_costs(model, repeats=args.repeats)
        h = hidden[exits[0]][:1]
        vocab_s = {}
        for n in (int(v) for v in args.vocab.split(",")):
            rows = model.head_weight(exits[0])[order[:n]].contiguous()
            vocab_s[n] = median_seconds(lambda rows=rows: (F.linear(h, rows).float().softmax(-1).amax(-1)), args.repeats)

    top1 = torch.stack([stats.layers[layer].top1 for layer in [*exits, num_layers]])
    final_top1 = stats.layers[num_layers].top1
    # Per policy: confidence [exit, token], the costs it is charged with, and its name in Costs.
    policies: dict[str, tuple[torch.Tensor, Any, str]] = {}
    for name in ("max_prob", "learned"):
        if all(name in stats.layers[layer].confidence for layer in exits):
            policies[name] = (torch.stack([stats.layers[layer].confidence[name] for layer in exits]), costs, name)
    for n, check_s in vocab_s.items():
        policies[f"frequent_{n}"] = (
            torch.stack([frequent_confidence(hidden[layer], model.head_weight(layer), order[:n]) for layer in exits]),
            dataclasses.replace(costs, frequent_head_s=check_s),
            "frequent",
        )
    curves = {name: frontier(conf, top1, final_top1, policy_costs, exits, num_layers, policy)
              for name, (conf, policy_costs, policy) in policies.items()}
    per_exit = {name: per_exit_frontier(conf, top1, policy_costs, exits, num_layers, policy)
                for name, (conf, policy_costs, policy) in policies.items()}
    agrees = torch.stack([stats.agrees(layer) for layer in exits])
    index = oracle_exit(agrees)
    fractions = exit_fractions(index, len(exits))
    oracle = {"agreement": float((chosen(top1, index) == final_top1).float().mean()), "fractions": fractions,
              "speedup": costs.sequence_speedup(index.tolist(), exits, num_layers, "oracle"),
              "speedup_without_catch_up": costs.speedup(fractions, exits, num_layers, "oracle")}

    rows = []
    for name, points in curves.items():
        rows.append([name, *("-" if (best := best_at(points, floor)) is None
                             else f"{best['speedup']:.2f}x @ {best['threshold']:g}" for floor in FLOORS)])
        rows.append(["  per exit", *("-" if (best := best_at(per_exit[name], floor)) is None
                                     else f"{best['speedup']:.2f}x @ {'/'.join(f'{t:g}' for t in best['thresholds'])}"
                                     for floor in FLOORS)])
    rows.append(["oracle", *[f"{oracle['speedup']:.2f}x"] * len(FLOORS)])
    rows.append(["  catch-up free", *[f"{oracle['speedup_without_catch_up']:.2f}x"] * len(FLOORS)])
    print_table(console, f"Modelled speedup at an agreement floor, {len(final_top1)} held-out tokens, exits {exits}",
                ["policy", *(f">= {floor:.0%}" for floor in FLOORS)], rows)
    hypothetical = what_if(costs, exits, num_layers)
    print_table(console, "The oracle bound of exits that agreed more, at these costs",
                ["agreement at exits " + "/".join(map(str, exits[:3])), "oracle", "catch-up free"],
                [["/".join(f"{a:.0%}" for a in row["agreement"]), f"{row['oracle']:.2f}x",
                  f"{row['oracle_without_catch_up']:.2f}x"] for row in hypothetical])
    timing = {"layer_ms": costs.layer_s * 1e3, "head_ms": costs.head_s * 1e3, "final_ms": costs.final_s * 1e3,
              "layer_over_positions_ms": [s * 1e3 for s in costs.layer_rows_s],
              "frequent_head_ms": {str(n): s * 1e3 for n, s in vocab_s.items()},
              "exit_ms": {str(k): v * 1e3 for k, v in costs.exit_s.items()},
              "estimator_ms": {str(k): v * 1e3 for k, v in costs.estimator_s.items()}}
    console.print("batch-1 costs (ms): " + ", ".join(
        f"{k} {v:.3f}" for k, v in timing.items() if isinstance(v, float)) + "; frequent heads "
        + ", ".join(f"{n}: {ms:.3f}" for n, ms in timing["frequent_head_ms"].items()))
    agreement = {str(layer): stats.agreement(layer) for layer in exits}
    out = write_json(args.out / "confidence_frontier.json", {
        "benchmark": "confidence_frontier", "created": now_iso(), "machine": machine_info(),
        "args": vars(args) | {"out": str(args.out)}, "run_dir": str(run_dir), "exits": exits,
        "heldout_tokens": len(final_top1), "exit_agreement": agreement, "costs": timing,
        "curves": curves, "oracle": oracle, "what_if": hypothetical,
        "best": {name: {str(floor): best_at(points, floor) for floor in FLOORS} for name, points in curves.items()},
        "best_per_exit": {name: {str(floor): best_at(points, floor) for floor in FLOORS}
                          for name, points in per_exit.items()},
    })
    plot(curves, oracle, args.out / "confidence_frontier.png")
    console.print(f"wrote {out} and {args.out / 'confidence_frontier.png'}")


def plot(curves: dict[str, list[dict[str, float]]], oracle: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eetune.rundir import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        ax.plot([p["agreement"] * 100 for p in points], [p["speedup"] for p in points], marker=".", label=name)
    ax.scatter([oracle["agreement"] * 100], [oracle["speedup"]], marker="*", s=120, color="black", label="oracle")
    ax.axvline(95, color="grey", linestyle=":", linewidth=1)
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("token agreement with the final layer (%)")
    ax.set_ylabel("modelled speedup over full")
    ax.set_title("Confidence policies on held-out chat (teacher-forced)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


if __name__ == "__main__":
    main()
