"""Where a decode step's time goes, and what each decode goal would take; one run, one process.

On SmolLM2-135M, batch 1, the model's dtype:

1. ceiling: the step's matmuls alone (every layer's seven linears and the LM head, as GEMVs on
   the real weights, back to back): the tokens/s no engine can beat with this machine's kernels.
2. our `full` engine and Hugging Face transformers `generate` on the same prompts: tokens/s, and
   a torch.profiler breakdown of a token's time by op category (matmul, attention, norms, RoPE,
   KV cache, other ops) plus the time outside ops (Python and dispatch).
3. early-exit arithmetic from `eetune eval`'s cost model (eetune.eval.timing: one decoder layer,
   one vocabulary head, each exit module, measured at batch 1): the cost of a token leaving at
   each exit relative to a full token (`max_prob` pays a head at every exit it passes, `learned`
   only where the token leaves); and for `self_speculative` the cost of a round (k drafts at
   exit L + one verify forward of k + 1 positions), hence the per-token acceptance rate a round
   needs to break even and to reach the 1.4x goal (measured rates: decode.py's decode.json).

    .venv/bin/python scripts/bench/decode_profile.py --run-dir runs/smollm2_135m [--decode-json DIR/decode.json]

Writes decode_profile.json and decode_profile.png (per-token time by category) under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DEFAULT_OUT_DIR, hf_greedy_generate, machine_info, make_console, now_iso, print_table, write_json,
)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from eetune.eval.timing import Costs, measure_costs, median_seconds  # noqa: E402
from eetune.exits import EarlyExitModel, load_exits  # noqa: E402
from eetune.exits.modules import lm_head_weight  # noqa: E402
from eetune.infer.engine import DecodeSettings, Engine  # noqa: E402
from eetune.infer.generate import Generator  # noqa: E402
from eetune.models import default_smollm2_dir, load_base_model  # noqa: E402
from eetune.rundir import atomic_write  # noqa: E402
from eetune.data.chat import build_prompt_ids  # noqa: E402

PROMPTS_FILE = Path(__file__).resolve().parent / "prompts.txt"
# aten op name fragments -> category; the first match wins, unmatched ops are "other ops".
CATEGORIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_weight_int8")),
    ("attention", ("scaled_dot_product", "flash_attention", "aten::_softmax")),
    ("norm", ("rms_norm", "aten::pow", "aten::mean", "aten::rsqrt")),
    ("rope", ("complex", "view_as_real", "aten::neg", "aten::sin", "aten::cos", "rotary")),
    ("kv cache", ("index_copy", "aten::cat", "aten::index_put", "aten::slice_scatter")),
)
OUTSIDE = "outside ops (Python, dispatch)"


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    console = make_console()
    torch.manual_seed(0)
    base = load_base_model("smollm2_135m", checkpoint_dir=default_smollm2_dir(), dtype=args.dtype)
    model = load_exits(args.run_dir, base.model, base.fingerprint)
    prompts = [p for p in PROMPTS_FILE.read_text().splitlines() if p.strip()][: args.prompts]
    prompt_ids = [build_prompt_ids(base.tokenizer, p, chat=True) for p in prompts]
    engine = Engine(EarlyExitModel(base.model, []))
    hf_generate = hf_greedy_generate(base.checkpoint_dir, args.dtype)

    with console.status("measuring the matmul ceiling"):
        ceiling_s = _ceiling_seconds(base.model, args.repeats)
    with console.status("decoding: ours and transformers, interleaved"):
        engine.generate(prompt_ids[0], DecodeSettings(max_new_tokens=8))  # warm-up
        hf_generate(prompt_ids[0], 8)
        ours_s, hf_s, tokens = 0.0, 0.0, 0
        for ids in prompt_ids:
            r = engine.generate(ids, DecodeSettings(max_new_tokens=args.new_tokens))
            ours_s += r.decode_s
            hf_s += hf_generate(ids, args.new_tokens)[1]
            tokens += args.new_tokens - 1
    with console.status("profiling"):
        ours_profile = _profile(lambda: engine.generate(prompt_ids[0], DecodeSettings(max_new_tokens=args.new_tokens)),
                                args.new_tokens)
        hf_profile = _profile(lambda: hf_generate(prompt_ids[0], args.new_tokens), args.new_tokens)
    with console.status("timing the early-exit pieces"):
        costs = measure_costs(model, context=96, repeats=args.repeats)
        spec_pieces = _speculative_pieces(model, costs, args.repeats, args.draft_vocab)

    ours_tps, hf_tps = tokens / ours_s, tokens / hf_s
    ceiling_tps = 1.0 / ceiling_s
    exits_cost = _exit_costs(model.exit_layers, model.num_layers, costs)
    spec = _speculative_costs(model, costs, spec_pieces, args.spec, args.draft_vocab,
                              _measured_acceptance(args.decode_json))
    report: dict[str, Any] = {
        "benchmark": "decode_profile",
        "created": now_iso(),
        "model": "smollm2_135m",
        "dtype": args.dtype,
        "run_dir": str(args.run_dir),
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "machine": machine_info(),
        "tokens_per_s": {"matmul_ceiling": ceiling_tps, "ours_full": ours_tps, "hf_transformers": hf_tps},
        "ours_vs_hf": ours_tps / hf_tps,
        "ours_fraction_of_ceiling": ours_tps / ceiling_tps,
        "hf_fraction_of_ceiling": hf_tps / ceiling_tps,
        "per_token_ms_by_category": {"ours_full": ours_profile, "hf_transformers": hf_profile},
        "cost_model_ms": {"layer": costs.layer_s * 1e3, "head": costs.head_s * 1e3, "final": costs.final_s * 1e3,
                          "exits": {layer: s * 1e3 for layer, s in costs.exit_s.items()},
                          "draft_head": spec_pieces.get("draft_head", 0.0) * 1e3,
                          "verify": {key: s * 1e3 for key, s in spec_pieces["verify"].items()}},
        "exit_cost_vs_full_token": exits_cost,
        "self_speculative": spec,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "decode_profile.json", report)
    _print(console, report)
    _plot(report, args.out / "decode_profile.png")
    console.print(f"wrote {args.out / 'decode_profile.json'} and {args.out / 'decode_profile.png'}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="tune run dir whose exits to cost")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30, help="timings per piece (median)")
    parser.add_argument("--spec", default="8:4,16:4,24:3", help="self_speculative settings to cost, EXIT:K,...")
    parser.add_argument("--draft-vocab", type=int, default=4096,
                        help="also cost drafting over this many most frequent tokens (FR-Spec; 0 = off)")
    parser.add_argument("--decode-json", type=Path, default=None,
                        help="decode.py's decode.json: the acceptance rates it measured, shown beside the needed ones")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    return parser.parse_args(argv)


# --- measurements ---------------------------------------------------------------------------------


@torch.inference_mode()
def _ceiling_seconds(backbone: torch.nn.Module, repeats: int) -> float:
    """One token's matmuls only: every linear of every layer and the LM head, one row each."""
    weights = []
    for layer in backbone.layers:
        attn, mlp = layer.attn, layer.mlp
        weights += [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.output_proj.weight,
                    mlp.w1.weight, mlp.w3.weight, mlp.w2.weight]
    weights.append(lm_head_weight(backbone))
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}

    def step() -> None:
        for w in weights:
            F.linear(inputs[w.shape[1]], w)

    return median_seconds(step, repeats)


def _category(name: str) -> str:
    for category, fragments in CATEGORIES:
        if any(f in name for f in fragments):
            return category
    return "other ops"


def _profile(run: Callable[[], Any], tokens: int) -> dict[str, float]:
    """Milliseconds per generated token by category (self time of ops; the rest is outside ops).

    Profiling adds its own per-op cost, so shares matter more than the absolute numbers.
    """
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        run()
        wall_ms = (time.perf_counter() - t0) * 1e3
    by_category: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("aten::") or event.key.startswith("mkldnn") or event.key.startswith("torchao"):
            key = _category(event.key)
            by_category[key] = by_category.get(key, 0.0) + event.self_cpu_time_total / 1e3
    ops_ms = sum(by_category.values())
    by_category[OUTSIDE] = max(wall_ms - ops_ms, 0.0)
    return {k: v / tokens for k, v in by_category.items()}


@torch.inference_mode()
def _speculative_pieces(model: EarlyExitModel, costs: Costs, repeats: int, draft_vocab: int) -> dict[str, Any]:
    """Seconds of what a self-speculative round adds to the eval cost model's pieces: a draft
    head over the most frequent tokens, and verify forwards (k + 1 positions from exit L on)."""
    backbone = model.backbone
    gen = Generator(backbone, max_seq_len=costs.context + 16)
    gen.prefill(torch.randint(0, gen.vocab_size, (1, costs.context)))
    h = backbone.tok_embeddings(torch.tensor([[1]]))
    pieces: dict[str, Any] = {"verify": {}}
    if draft_vocab and model.exit_layers:
        rows = model.head_weight(model.exit_layers[0])[:draft_vocab].contiguous()
        pieces["draft_head"] = median_seconds(lambda: F.linear(h[:, -1], rows).float(), repeats)
    for k in (1, 2, 3, 4, 6, 8):
        x, span = h.expand(1, k + 1, -1).contiguous(), gen.span(costs.context, k + 1)
        for layer in model.exit_layers:
            pieces["verify"][f"{layer}:{k}"] = median_seconds(
                lambda: gen.final_logits(gen.run_layers(x, layer, model.num_layers, span)[0]), repeats
            )
    return pieces


# --- arithmetic -----------------------------------------------------------------------------------


def _exit_costs(exit_layers: list[int], num_layers: int, costs: Costs) -> dict[str, Any]:
    """A token's cost relative to a full token when it leaves at each exit (or at none), per policy."""
    full = costs.full_token(num_layers)
    table: dict[str, Any] = {"head_in_layers": costs.head_s / costs.layer_s}
    for policy in ("max_prob", "learned"):
        per_index = costs.index_costs(exit_layers, num_layers, policy)
        table[policy] = {f"exit_{layer}": c / full for layer, c in zip([*exit_layers, "none"], per_index)}
        table[policy]["no_exit"] = table[policy].pop("exit_none")
    return table


def _speculative_costs(
    model: EarlyExitModel, costs: Costs, pieces: dict[str, Any], spec: str, draft_vocab: int,
    measured: dict[str, float],
) -> list[dict[str, Any]]:
    """Per setting: a round's cost in full tokens, and the acceptance rate for 1.0x and 1.4x.

    A round drafts k tokens (layers 1..L, the exit, a head each), runs the last draft through
    layers 1..L, and verifies all k + 1 positions from layer L on. At acceptance rate r
    (accepted / drafted, as the engine reports it) a round yields 1 + k r tokens on average
    (the accepted prefix and the verifier's own token), so speedup = (1 + k r) full / round.
    """
    full = costs.full_token(model.num_layers)
    rows = []
    for item in spec.split(","):
        layer, k = (int(x) for x in item.split(":"))
        if layer not in model.exit_layers or f"{layer}:{k}" not in pieces["verify"]:
            continue
        for vocab in (0, draft_vocab) if draft_vocab else (0,):
            head = pieces["draft_head"] if vocab else costs.head_s
            draft = layer * costs.layer_s + costs.exit_s[layer] + head
            round_s = k * draft + layer * costs.layer_s + pieces["verify"][f"{layer}:{k}"]

            def needed(speedup: float, k: int = k, round_s: float = round_s) -> float | None:
                rate = (speedup * round_s / full - 1) / k
                return max(rate, 0.0) if rate <= 1.0 else None  # None: unreachable even if all accepted

            rows.append({
                "draft_exit": layer,
                "draft_len": k,
                "draft_vocab": vocab or None,
                "round_cost_in_full_tokens": round_s / full,
                "max_speedup_all_accepted": (1 + k) * full / round_s,
                "acceptance_for_1x": needed(1.0),
                "acceptance_for_1_4x": needed(1.4),
                "measured_acceptance": measured.get(f"{layer}:{k}:{vocab}"),
            })
    return rows


def _measured_acceptance(decode_json: Path | None) -> dict[str, float]:
    """'exit:k:vocab' -> the best acceptance rate decode.py measured for that draft (vocab 0: all)."""
    if decode_json is None:
        return {}
    best: dict[str, float] = {}
    for entry in json.loads(decode_json.read_text())["results"]:
        s, rate = entry.get("settings") or {}, entry.get("acceptance_rate")
        if s.get("mode") == "self_speculative" and rate is not None:
            key = f"{s['draft_exit']}:{s['draft_len']}:{s.get('draft_vocab') or 0}"
            best[key] = max(best.get(key, 0.0), rate)
    return best


# --- output ---------------------------------------------------------------------------------------


def _print(console, r: dict[str, Any]) -> None:
    tps = r["tokens_per_s"]
    print_table(console, f"decode, SmolLM2-135M {r['dtype']}, batch 1", ["", "tok/s", "of ceiling"], [
        ["matmuls only (ceiling)", f"{tps['matmul_ceiling']:.1f}", "100%"],
        ["ours full", f"{tps['ours_full']:.1f}", f"{r['ours_fraction_of_ceiling']:.0%}"],
        ["hf transformers", f"{tps['hf_transformers']:.1f}", f"{r['hf_fraction_of_ceiling']:.0%}"],
    ], caption=f"ours / hf = {r['ours_vs_hf']:.2f}x")
    profiles = r["per_token_ms_by_category"]
    categories = sorted({c for prof in profiles.values() for c in prof}, key=lambda c: -profiles["ours_full"].get(c, 0))
    print_table(console, "ms per token by category (torch.profiler; profiling inflates per-op cost)",
                ["category", "ours", "hf"],
                [[c, f"{profiles['ours_full'].get(c, 0):.2f}", f"{profiles['hf_transformers'].get(c, 0):.2f}"]
                 for c in categories])
    costs = r["exit_cost_vs_full_token"]
    exits = [k for k in costs["max_prob"] if k != "no_exit"]
    print_table(console, f"a token's cost in full tokens (one vocab head = {costs['head_in_layers']:.1f} layers)",
                ["policy", *exits, "no exit"],
                [[policy, *(f"{costs[policy][e]:.2f}" for e in exits), f"{costs[policy]['no_exit']:.2f}"]
                 for policy in ("max_prob", "learned")])

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.0%}"

    print_table(console, "self_speculative: acceptance needed", [
        "draft", "round cost", "max speedup", "for 1.0x", "for 1.4x", "measured"], [
        [f"exit {s['draft_exit']} k={s['draft_len']}" + (f" vocab {s['draft_vocab']}" if s["draft_vocab"] else ""),
         f"{s['round_cost_in_full_tokens']:.2f}",
         f"{s['max_speedup_all_accepted']:.2f}x", pct(s["acceptance_for_1x"]), pct(s["acceptance_for_1_4x"]),
         pct(s["measured_acceptance"])] for s in r["self_speculative"]
    ], caption="round cost: k drafts + verify, in full tokens; acceptance = accepted / drafted tokens")


def _plot(r: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = r["per_token_ms_by_category"]
    labels = ["ours_full", "hf_transformers"]
    categories = sorted({c for prof in profiles.values() for c in prof}, key=lambda c: -profiles["ours_full"].get(c, 0))
    fig, ax = plt.subplots(figsize=(8, 3))
    left = [0.0] * len(labels)
    for category in categories:
        values = [profiles[label].get(category, 0.0) for label in labels]
        ax.barh(labels, values, left=left, label=category)
        left = [a + b for a, b in zip(left, values)]
    ax.axvline(1e3 / r["tokens_per_s"]["matmul_ceiling"], color="black", linestyle="--", label="matmul ceiling")
    ax.set_xlabel("ms per token (profiled)")
    ax.set_title(f"SmolLM2-135M {r['dtype']} decode: where a token's time goes")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


if __name__ == "__main__":
    main()
