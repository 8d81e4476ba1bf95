"""Decoding speed and quality on SmolLM2-135M, side by side in one run.

Cases, all greedy, batch 1, the same chat prompts and number of new tokens (stop tokens are
ignored so every case decodes exactly that many):

- `hf`: Hugging Face transformers `generate` on the same weights and dtype (the baseline).
- `full`: our engine with the full model (every speedup below is relative to it).
- `early_exit`: each threshold x each confidence policy (max_prob, learned, frequent), and
  `--exit-thresholds` settings with one threshold per exit (eval's per-exit calibration).
- `self_speculative`: each drafting exit x draft length x draft schedule (`constant`: k every
  round; `adaptive`: as many as pay from the running acceptance, up to k), with the whole
  vocabulary or a restricted draft vocabulary (FR-Spec); output must equal `full`.
- `int8` (optional): `full` on torchao weight-only int8 weights, reported separately.

Every case runs on each prompt set of `--prompt-sets`: `bench` (scripts/bench/prompts.txt) and
`unseen` (scripts/bench/prompts_unseen.txt: topics no tuning prompt touches, checked by a test).
Cases run interleaved prompt by prompt, so a change in machine load affects them alike.
Decode speed counts tokens after the first one (prefill excluded) for every case, HF too
(timed with a streamer). Quality, against the full model:
- token agreement: the fraction of a case's tokens that the full model, given the same prefix
  (the case's own earlier tokens), would also have chosen greedily; each token judged alone;
- sequence agreement: the fraction of positions holding the same token as `full`'s own output,
  and how many outputs are identical. One different token derails the rest of a greedy
  continuation, so this one is harsh: bf16 rounding alone (HF vs ours) takes it far below 100%.

    .venv/bin/python scripts/bench/decode.py --run-dir runs/smollm2_135m [--prompts 10] [--new-tokens 128] \
        [--prompt-sets bench,unseen] [--draft-schedules constant,adaptive] [--int8] [--assisted] [--serve]

Writes decode.json and decode.png (speedup vs agreement, one panel per prompt set) under --out
and prints a table per prompt set.
`--assisted` and `--serve` also run assisted.py (transformers assisted generation with each
exit exported as a draft model) and serve_load.py (1-16 concurrent streaming clients against
`eetune serve` at max_batch_size 1 and 8, every mode) on the same exits; each writes its own JSON beside decode.json. The prompts
(scripts/bench/prompts.txt) are not among the ones `eetune data distill` makes tuning data from.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DEFAULT_OUT_DIR, hf_greedy_generate, machine_info, make_console, now_iso, print_table, write_json,
)

import torch  # noqa: E402

from eetune.exits import load_exits  # noqa: E402
from eetune.infer.draft_vocab import load_token_order  # noqa: E402
from eetune.infer.engine import DecodeResult, DecodeSettings, Engine  # noqa: E402
from eetune.infer.generate import Generator  # noqa: E402
from eetune.infer.policy import describe_thresholds, parse_thresholds  # noqa: E402
from eetune.models import default_smollm2_dir, load_base_model  # noqa: E402
from eetune.rundir import atomic_write, resolve_run_dir  # noqa: E402
from eetune.data.chat import build_prompt_ids, stop_token_ids  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
# Chat prompts no tuning data was made from; `unseen` also on topics absent from every tuning prompt.
PROMPT_SETS = {"bench": BENCH_DIR / "prompts.txt", "unseen": BENCH_DIR / "prompts_unseen.txt"}


@dataclass
class Case:
    name: str
    kind: str  # hf | full | early_exit | self_speculative | int8
    settings: DecodeSettings | None = None
    decode_s: float = 0.0
    tokens: int = 0  # decoded after the first, summed over prompts
    outputs: list[list[int]] = field(default_factory=list)
    mean_layers: list[float] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0

    def add(self, tokens: list[int], decode_s: float, mean_layers: float | None = None) -> None:
        self.outputs.append(tokens)
        self.decode_s += decode_s
        self.tokens += max(len(tokens) - 1, 0)
        if mean_layers is not None:
            self.mean_layers.append(mean_layers)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.decode_s if self.decode_s else 0.0


def main() -> None:
    args = _parse_args()
    args.run_dir = Path(resolve_run_dir(str(args.run_dir)))  # builtin:<name> too
    console = make_console()
    torch.manual_seed(0)
    base = load_base_model("smollm2_135m", checkpoint_dir=default_smollm2_dir(), dtype=args.dtype, device=args.device)
    model = load_exits(args.run_dir, base.model, base.fingerprint)
    stops = tuple(sorted(stop_token_ids(base.tokenizer)))
    engine = Engine(model, token_order=load_token_order(args.run_dir, always=stops))
    has_learned = all(model.exit(layer).confidence is not None for layer in model.exit_layers)
    runners: dict[str, Callable[[list[int]], tuple[list[int], float, float | None, int, int]]] = {}
    if args.hf:
        runners["hf"] = _hf_runner(base, args.dtype, args.new_tokens, args.device)
    if args.int8:
        runners["int8"] = _int8_runner(base, args.new_tokens)
    sets = {}
    for name in args.prompt_sets.split(","):
        if name not in PROMPT_SETS:
            raise SystemExit(f"--prompt-sets: unknown set {name!r}; choose from {', '.join(PROMPT_SETS)}")
        prompts = [p for p in PROMPT_SETS[name].read_text().splitlines() if p.strip()][: args.prompts]
        sets[name] = (prompts, [build_prompt_ids(base.tokenizer, p, chat=True) for p in prompts])
    # Warm-up: the first decode of a process pays one-time allocation costs.
    engine.generate(next(iter(sets.values()))[1][0], DecodeSettings(max_new_tokens=8))
    results: list[dict[str, Any]] = []
    for name, (prompts, prompt_ids) in sets.items():
        cases = _cases(args, model.exit_layers, has_learned, has_token_order=engine.token_order is not None)
        with console.status("decoding") as status:
            for i, ids in enumerate(prompt_ids):
                for case in cases:
                    status.update(f"{name} prompt {i + 1}/{len(prompt_ids)}: {case.name}")
                    if case.kind in runners:
                        tokens, decode_s, layers, drafted, accepted = runners[case.kind](ids)
                    else:
                        r = engine.generate(ids, case.settings)
                        tokens, decode_s, layers, drafted, accepted = (
                            r.tokens, r.decode_s, r.mean_layers, r.draft_tokens, r.accepted_tokens
                        )
                    case.add(tokens, decode_s, layers)
                    case.drafted += drafted
                    case.accepted += accepted
        set_results, rows = _score(base, cases, prompt_ids, args.new_tokens, name)
        results += set_results
        print_table(
            console,
            f"decode, SmolLM2-135M (Q4_1 GGUF dequantised) {args.dtype}, batch 1, "
            f"{len(prompts)} {name} chat prompts x {args.new_tokens} new tokens",
            ["case", "tok/s", "vs full", "mean layers", "token agr.", "seq. agr.", "identical", "accepted"],
            rows,
            caption=(f"exits {model.exit_layers} from {args.run_dir}; token agreement = the full model's greedy "
                     "choice after the same prefix; sequence agreement = same token as full's output at the same "
                     "position"),
        )
    report = {
        "benchmark": "decode",
        "created": now_iso(),
        "model": "smollm2_135m",
        "dtype": args.dtype,
        "device": args.device,
        "run_dir": str(args.run_dir),
        "exit_layers": model.exit_layers,
        "prompt_sets": {name: len(prompts) for name, (prompts, _) in sets.items()},
        "new_tokens": args.new_tokens,
        "machine": machine_info(),
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "decode.json", report)
    _plot(results, list(sets), args.out / "decode.png", title=f"SmolLM2-135M {args.dtype}: speed vs quality")
    console.print(f"wrote {args.out / 'decode.json'} and {args.out / 'decode.png'}")
    # The other two decode benchmarks, each in its own script and JSON, on the same exits.
    if args.assisted:
        import assisted

        assisted.main(["--run-dir", str(args.run_dir), "--max-new-tokens", str(args.new_tokens),
                       "--dtype", args.dtype, "--draft-tokens", "0", "3", "--out", str(args.out)])
    if args.serve:
        import serve_load

        serve_load.main(["--run-dir", str(args.run_dir), "--dtype", args.dtype, "--out", str(args.out)])


def _score(base, cases: list[Case], prompt_ids: list[list[int]], new_tokens: int, prompt_set: str):
    """Each case's results entry (speed against `full`, agreement, acceptance) and table row."""
    full = next(c for c in cases if c.kind == "full")
    judge = Generator(base.model, max_seq_len=max(len(ids) for ids in prompt_ids) + new_tokens)
    rows, results = [], []
    for case in cases:
        token_agree = _token_agreement(judge, prompt_ids, case.outputs)
        agree = _agreement(case.outputs, full.outputs)
        identical = sum(a == b for a, b in zip(case.outputs, full.outputs))
        entry: dict[str, Any] = {
            "prompt_set": prompt_set,
            "case": case.name,
            "kind": case.kind,
            "settings": None if case.settings is None else _settings_dict(case.settings),
            "tokens_per_s": case.tokens_per_s,
            "speedup_vs_full": case.tokens_per_s / full.tokens_per_s,
            "mean_layers": statistics.fmean(case.mean_layers) if case.mean_layers else None,
            "token_agreement_with_full": token_agree,
            "agreement_with_full": agree,
            "identical_outputs": identical,
            "acceptance_rate": case.accepted / case.drafted if case.drafted else None,
        }
        results.append(entry)
        rows.append(
            [
                case.name,
                f"{entry['tokens_per_s']:.1f}",
                f"{entry['speedup_vs_full']:.2f}x",
                "-" if entry["mean_layers"] is None else f"{entry['mean_layers']:.1f}",
                f"{token_agree:.1%}",
                f"{agree:.1%}",
                f"{identical}/{len(prompt_ids)}",
                "-" if entry["acceptance_rate"] is None else f"{entry['acceptance_rate']:.0%}",
            ]
        )
    return results, rows


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="tune run dir (or builtin:<name>) whose exits decode")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--thresholds", default="0.9,0.8,0.6,0.4,0.2")
    parser.add_argument("--policies", default="max_prob,learned,frequent")
    parser.add_argument("--exit-thresholds", default="",
                        help="early_exit with one threshold per exit, as POLICY:T1/T2/...[,POLICY:...] "
                             "(e.g. frequent:0.9/0.8/1 from eval's calibration)")
    parser.add_argument("--spec", default="8:4,16:4,24:3", help="self_speculative drafts as EXIT:K,...")
    parser.add_argument("--draft-vocab", default="0,4096", help="draft vocab sizes (0 = whole vocabulary)")
    parser.add_argument("--draft-confidence", default="0,0.5", help="estimator cuts of a draft (0 = off)")
    parser.add_argument("--draft-schedules", default="constant,adaptive", help="self_speculative draft schedules")
    parser.add_argument("--prompt-sets", default="bench,unseen", help=f"of {', '.join(PROMPT_SETS)}")
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip the transformers baseline")
    parser.add_argument("--int8", action="store_true", help="also run full on torchao int8 weight-only weights")
    parser.add_argument("--assisted", action="store_true",
                        help="also run assisted.py: transformers assisted generation with exported exit drafts")
    parser.add_argument("--serve", action="store_true",
                        help="also run serve_load.py: 1-16 concurrent clients against eetune serve, "
                             "max_batch_size 1 vs 8")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    return parser.parse_args()


def _cases(args: argparse.Namespace, exit_layers: list[int], has_learned: bool, has_token_order: bool) -> list[Case]:
    n = args.new_tokens
    cases = [Case("full", "full", DecodeSettings(max_new_tokens=n))]
    if args.hf:
        cases.append(Case("hf transformers", "hf"))
    if args.int8:
        cases.append(Case("full int8 (torchao)", "int8"))
    for policy in args.policies.split(","):
        if (policy == "learned" and not has_learned) or (policy == "frequent" and not has_token_order):
            continue
        for t in (float(x) for x in args.thresholds.split(",")):
            cases.append(
                Case(f"early_exit {policy} {t:g}", "early_exit",
                     DecodeSettings(mode="early_exit", threshold=t, confidence=policy, max_new_tokens=n))
            )
    for item in filter(None, args.exit_thresholds.split(",")):
        policy, _, values = item.partition(":")
        per_exit = parse_thresholds(values, "--exit-thresholds")
        if len(per_exit) != len(exit_layers):
            raise SystemExit(f"--exit-thresholds {item}: {len(per_exit)} thresholds for exits {exit_layers}")
        cases.append(
            Case(f"early_exit {policy} {values}", "early_exit",
                 DecodeSettings(mode="early_exit", exit_thresholds=per_exit, confidence=policy, max_new_tokens=n))
        )
    for item in args.spec.split(","):
        layer, k = (int(x) for x in item.split(":"))
        if layer not in exit_layers:
            continue
        for vocab in (int(v) for v in args.draft_vocab.split(",")):
            if vocab and not has_token_order:
                continue  # the run dir holds no token frequencies (an augment run)
            for conf in (float(c) for c in args.draft_confidence.split(",")):
                if conf and not has_learned:
                    continue
                for schedule in args.draft_schedules.split(","):
                    label = (f"self_spec exit {layer} k={k}" + (" adaptive" if schedule == "adaptive" else "")
                             + (f" vocab {vocab}" if vocab else "") + (f" conf {conf:g}" if conf else ""))
                    cases.append(
                        Case(label, "self_speculative",
                             DecodeSettings(mode="self_speculative", draft_exit=layer, draft_len=k,
                                            draft_schedule=schedule, draft_vocab=vocab or None,
                                            draft_confidence=conf or None, max_new_tokens=n))
                    )
    return cases


def _hf_runner(base, dtype: str, new_tokens: int, device: str):
    """transformers generate, greedy, exactly `new_tokens` tokens, decode time after the first."""
    generate = hf_greedy_generate(base.checkpoint_dir, dtype, device)

    def run(ids: list[int]):
        tokens, decode_s = generate(ids, new_tokens)
        return tokens, decode_s, None, 0, 0

    return run


def _int8_runner(base, new_tokens: int):
    """Our full engine on a weight-only int8 copy of the backbone (torchao)."""
    import copy

    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from eetune.exits import EarlyExitModel

    backbone = copy.deepcopy(base.model)
    quantize_(backbone, Int8WeightOnlyConfig())
    engine = Engine(EarlyExitModel(backbone, []))

    def run(ids: list[int]):
        r: DecodeResult = engine.generate(ids, DecodeSettings(max_new_tokens=new_tokens))
        return r.tokens, r.decode_s, r.mean_layers, 0, 0

    return run


@torch.inference_mode()
def _token_agreement(judge: Generator, prompts: list[list[int]], outputs: list[list[int]]) -> float:
    """Fraction of output tokens equal to the full model's greedy choice after the same prefix."""
    same = total = 0
    for ids, out in zip(prompts, outputs):
        if not out:
            continue
        logits = judge.prefill(ids + out[:-1], all_logits=True)[0, len(ids) - 1:]
        same += int((logits.argmax(-1).cpu() == torch.tensor(out)).sum())
        total += len(out)
    return same / total if total else 1.0


def _agreement(outputs: list[list[int]], reference: list[list[int]]) -> float:
    same = total = 0
    for a, b in zip(outputs, reference):
        same += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b))
    return same / total if total else 1.0


def _settings_dict(s: DecodeSettings) -> dict[str, Any]:
    return {
        "mode": s.mode, "threshold": s.threshold if s.exit_thresholds is None else None,
        "exit_thresholds": None if s.exit_thresholds is None else list(s.exit_thresholds),
        "confidence": s.confidence, "draft_exit": s.draft_exit,
        "draft_len": s.draft_len, "draft_schedule": s.draft_schedule, "draft_vocab": s.draft_vocab,
        "draft_confidence": s.draft_confidence,
    }


def _plot(results: list[dict], sets: list[str], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets), figsize=(7 * len(sets), 4.5), squeeze=False)
    for ax, name in zip(axes[0], sets):
        _plot_set(ax, [r for r in results if r["prompt_set"] == name])
        ax.set_title(f"{title} ({name} prompts)")
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _plot_set(ax, results: list[dict]) -> None:
    for policy, marker in (("max_prob", "o"), ("learned", "s"), ("frequent", "D")):
        ours = [r for r in results if r["kind"] == "early_exit" and r["settings"]["confidence"] == policy]
        points = [r for r in ours if r["settings"].get("exit_thresholds") is None]
        if points:
            ax.plot([r["speedup_vs_full"] for r in points], [r["token_agreement_with_full"] for r in points],
                    marker=marker, label=f"early exit ({policy})")
            for r in points:
                ax.annotate(f"{r['settings']['threshold']:g}", (r["speedup_vs_full"], r["token_agreement_with_full"]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
        for j, r in enumerate(r for r in ours if r["settings"].get("exit_thresholds") is not None):
            ax.scatter([r["speedup_vs_full"]], [r["token_agreement_with_full"]], marker=marker, s=60, facecolors="none",
                       edgecolors="black", label=f"early exit ({policy}), one threshold per exit" if j == 0 else None)
            ax.annotate(describe_thresholds(r["settings"]["exit_thresholds"]),
                        (r["speedup_vs_full"], r["token_agreement_with_full"]), fontsize=7, xytext=(3, -9),
                        textcoords="offset points")
    for schedule, color in (("constant", "tab:green"), ("adaptive", "tab:olive")):
        spec = [r for r in results if r["kind"] == "self_speculative" and r["settings"]["draft_schedule"] == schedule]
        if spec:
            ax.scatter([r["speedup_vs_full"] for r in spec], [r["token_agreement_with_full"] for r in spec],
                       marker="*", s=120, color=color, label=f"self-speculative, {schedule} (lossless)", zorder=3)
    for r in results:
        if r["kind"] in ("hf", "int8"):
            ax.scatter([r["speedup_vs_full"]], [r["token_agreement_with_full"]], marker="^", s=70, label=r["case"])
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("decode speed vs our full model (x)")
    ax.set_ylabel("token agreement with full (same prefix)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


if __name__ == "__main__":
    main()
