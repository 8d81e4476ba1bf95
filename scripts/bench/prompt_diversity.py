"""Do the exits learn more from more distinct prompts? Equal tokens, few prompts vs many.

From one self-distilled chat corpus (several sampled answers per prompt) it writes two training
sets of equal answer tokens and tunes the same recipe on each for the same steps:
  - `many prompts`: one answer for each training prompt;
  - `few prompts`: every answer of as few prompts as give the same tokens.
Both files carry the corpus's held-out documents (whole prompts, `data.heldout_by=prompt`) in
the corpus's order, so both runs score on the same held-out windows as a run on the corpus itself.
Then `tuning_curves.py` draws them (and `--reference` runs) side by side.

    .venv/bin/python scripts/bench/prompt_diversity.py --corpus runs/builtin/chat.jsonl \
        --steps 350 --reference "shipped (parts 000-004)=runs/long/tune" [--out runs/bench/prompt_diversity]

Each tune resumes where an interrupted one stopped. Writes subsets.json (prompts, answers and
answer tokens of each set), the runs under OUT/runs/, and tuning_curves.{json,md,png} in OUT.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_OUT_DIR, REPO_ROOT, machine_info, now_iso, write_json  # noqa: E402

import tuning_curves  # noqa: E402

from eetune.config import compose_config  # noqa: E402
from eetune.data.corpus import heldout_key, is_heldout  # noqa: E402
from eetune.data.jsonl import iter_jsonl  # noqa: E402
from eetune.data.sources import record_document  # noqa: E402

RECIPE = "smollm2_135m_chat"


def split_records(corpus: Path, heldout_fraction: float) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """The corpus's held-out lines (in order) and its training lines grouped by prompt (in order),
    each training line with its answer tokens."""
    heldout: list[str] = []
    by_prompt: dict[str, list[tuple[str, int]]] = {}
    for where, record in iter_jsonl(corpus, "corpus"):
        doc = record_document(record, where, "text", "messages")
        line = json.dumps(record, ensure_ascii=False)
        if is_heldout(doc, heldout_fraction):
            heldout.append(line)
        else:
            by_prompt.setdefault(heldout_key(doc), []).append((line, int(record["tokens"])))
    return heldout, by_prompt


def many_prompts(by_prompt: dict[str, list[tuple[str, int]]]) -> list[tuple[str, int]]:
    """The first answer of every prompt."""
    return [answers[0] for answers in by_prompt.values()]


def few_prompts(by_prompt: dict[str, list[tuple[str, int]]], tokens: int) -> list[tuple[str, int]]:
    """Every answer of the prompts with the most answers, until `tokens` answer tokens."""
    ranked = sorted(by_prompt.values(), key=len, reverse=True)
    chosen: list[tuple[str, int]] = []
    total = 0
    for answers in ranked:
        for line, count in answers:
            if total >= tokens:
                return chosen
            chosen.append((line, count))
            total += count
    return chosen


def write_subset(path: Path, heldout: list[str], train: list[tuple[str, int]]) -> dict:
    """Held-out lines first (their order fixes the held-out windows), then the training lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in heldout + [line for line, _ in train]), encoding="utf-8")
    tmp.replace(path)
    prompts = {json.loads(line)["messages"][0]["content"] for line, _ in train}
    return {"path": str(path), "train_prompts": len(prompts), "train_answers": len(train),
            "train_answer_tokens": sum(count for _, count in train), "heldout_answers": len(heldout)}


def tune(data: Path, run_dir: Path, steps: int, overrides: list[str]) -> None:
    resume = (run_dir / "state").exists()
    command = [sys.executable, "-m", "eetune", "tune", f"recipe={RECIPE}", f"data.path={data}",
               f"run_dir={run_dir}", f"train.steps={steps}", "train.flat_patience=0",
               f"resume={str(resume).lower()}", *overrides]
    print(" ".join(command), flush=True)
    subprocess.run(command, cwd=REPO_ROOT, check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="a distilled chat corpus (JSONL with 'tokens')")
    parser.add_argument("--steps", type=int, default=350, help="tuning steps per set (8 x 256 tokens each)")
    parser.add_argument("--reference", action="append", default=[], metavar="LABEL=RUN_DIR",
                        help="other tune runs on the same held-out windows to draw beside them")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR / "prompt_diversity")
    parser.add_argument("overrides", nargs="*", help="extra `eetune tune` overrides for both runs")
    args = parser.parse_args(argv)

    # The recipe's own split (data.heldout_by=prompt): the tunes hold out exactly these lines.
    heldout, by_prompt = split_records(args.corpus, compose_config("tune", [f"recipe={RECIPE}"]).data.heldout_fraction)
    many = many_prompts(by_prompt)
    few = few_prompts(by_prompt, sum(count for _, count in many))
    subsets = {
        "many prompts": write_subset(args.out / "data" / "many_prompts.jsonl", heldout, many),
        "few prompts": write_subset(args.out / "data" / "few_prompts.jsonl", heldout, few),
    }
    write_json(args.out / "subsets.json", {
        "benchmark": "prompt_diversity", "created": now_iso(), "machine": machine_info(),
        "corpus": str(args.corpus), "steps": args.steps, "overrides": args.overrides, "subsets": subsets,
    })
    print(json.dumps(subsets, indent=2), flush=True)

    runs = []
    for label, subset in subsets.items():
        run_dir = args.out / "runs" / label.replace(" ", "_")
        tune(Path(subset["path"]), run_dir, args.steps, args.overrides)
        runs.append(f"{label} ({subset['train_prompts']} prompts)={run_dir}")
    tuning_curves.main([arg for run in runs + args.reference for arg in ("--run", run)] + ["--out", str(args.out)])


if __name__ == "__main__":
    main()
