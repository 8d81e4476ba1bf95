"""transformers' assisted generation with an exported exit as the draft vs plain greedy generate.

`eetune export draft` turns "layers 1..L + the exit at L" into a standard causal LM; this runs
it as `assistant_model` against the base model in Hugging Face transformers, side by side with
plain `generate`, over several chat prompts: tokens/s, speedup, tokens accepted per target
forward, and whether the output is identical to plain greedy decoding (it must be).

    .venv/bin/python scripts/bench/assisted.py --run-dir runs/quick [--exits 8 24] \\
        [--draft-tokens 0 4] [--max-new-tokens 128] [--dtype float32] [--out runs/bench]

`--draft-tokens` are the tokens drafted per round (transformers' `num_assistant_tokens`); 0 keeps
transformers' defaults (20, cut short where the draft's confidence falls under an adaptive
threshold). Each generate call starts from the draft's pristine generation config, so the
threshold transformers adapts in place never carries from one prompt to the next. The run's
base model is loaded from where the run recorded it (the bundled SmolLM2 by default). Plain and
assisted runs alternate prompt by prompt, so a change in machine load hits both.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_OUT_DIR, machine_info, make_console, now_iso, print_table, write_json  # noqa: E402

from eetune.config import compose_config  # noqa: E402
from eetune.exits import read_manifest  # noqa: E402
from eetune.stages import export  # noqa: E402

PROMPTS = (
    "What is the capital of France? Tell me a little about the city.",
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle stays upright while it moves.",
    "Give me three tips for writing clean Python code.",
    "What causes the seasons on Earth?",
    "Describe a healthy breakfast and explain why it is good for you.",
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="augment/tune run dir (or `eetune export hf` dir)")
    parser.add_argument("--exits", type=int, nargs="*", help="drafting exits (default: every exportable exit)")
    parser.add_argument("--draft-tokens", type=int, nargs="*", default=[0], help="tokens per draft; 0: transformers' default")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} prompts")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    console = make_console()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    manifest = read_manifest(args.run_dir)
    layers = args.exits or [e["layer"] for e in manifest["exits"] if e["arch"] != "embedding"]
    dtype = getattr(torch, args.dtype)

    with tempfile.TemporaryDirectory(prefix="eetune-assisted-") as scratch:
        drafts: dict[int, Any] = {}
        for layer in layers:
            cfg = compose_config("export", [
                "export.format=draft", f"export.run_dir={args.run_dir}", f"export.exit={layer}",
                f"export.out={Path(scratch) / f'draft{layer}'}", f"export.dtype={args.dtype}",
            ])
            result = export.run(cfg, console=console)
            drafts[layer] = AutoModelForCausalLM.from_pretrained(str(result.out), dtype=dtype).eval()
        base_dir = str(result.base_checkpoint_dir)
        target = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(base_dir)

        prompts = [_chat_ids(tokenizer, text) for text in PROMPTS[: args.prompts]]
        target_calls = _call_counter(target)
        settings = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
        target.generate(prompts[0], max_new_tokens=4, do_sample=False)  # warm up allocator and kernels

        modes = {_mode(layer, k): (layer, k) for layer in layers for k in args.draft_tokens}
        pristine = {layer: copy.deepcopy(draft.generation_config) for layer, draft in drafts.items()}
        rows: list[dict[str, Any]] = []
        for i, ids in enumerate(prompts):
            console.print(f"[bold]prompt {i + 1}/{len(prompts)}[/] ({ids.shape[1]} tokens)")
            plain = _timed(target, ids, settings, target_calls)
            rows.append({"prompt": i, "mode": "plain", **plain.summary()})
            for mode, (layer, k) in modes.items():
                draft = drafts[layer]
                draft.generation_config = copy.deepcopy(pristine[layer])
                if k:
                    draft.generation_config.num_assistant_tokens = k
                    draft.generation_config.num_assistant_tokens_schedule = "constant"
                assisted = _timed(target, ids, {**settings, "assistant_model": draft}, target_calls)
                rows.append({
                    "prompt": i, "mode": mode, "exit": layer, "draft_tokens": k or None, **assisted.summary(),
                    "identical": bool(torch.equal(assisted.output, plain.output)),
                    "speedup": plain.seconds / assisted.seconds,
                })
        sample = tokenizer.decode(plain.output[0, prompts[-1].shape[1]:], skip_special_tokens=True)

    summary = _summarise(rows, list(modes))
    exits = {str(e["layer"]): e for e in manifest["exits"]}
    report = {
        "benchmark": "assisted",
        "created": now_iso(),
        "run_dir": str(args.run_dir),
        "run_stage": manifest.get("stage"),
        "exits": [exits[str(layer)] for layer in layers],
        # Held-out CE and top-1 agreement with the final layer, per exit, as the run measured them.
        "heldout": (manifest.get("tune") or {}).get("heldout") or manifest.get("heldout_before_tuning"),
        "base_model": manifest["base_model"],
        "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens,
        "prompts": list(PROMPTS[: args.prompts]),
        "draft_tokens": args.draft_tokens,
        "machine": machine_info(),
        "summary": summary,
        "per_prompt": rows,
        "sample_output": sample,
    }
    out = write_json(args.out / "assisted.json", report)
    table = [
        [s["mode"], f"{s['tokens']}", f"{s['tokens_per_s']:.1f}", f"{s['speedup']:.2f}x" if s["speedup"] else "1.00x",
         f"{s['tokens_per_target_forward']:.2f}", s["identical"]]
        for s in summary
    ]
    print_table(
        console,
        f"transformers greedy generate, {args.max_new_tokens} new tokens x {len(prompts)} chat prompts, {args.dtype}",
        ["mode", "tokens", "tok/s", "speedup", "tokens/target fwd", "identical"],
        table,
        caption=f"base {manifest['base_model']['name']}; run {args.run_dir} ({manifest.get('stage')}); "
        "speedup = plain seconds / assisted seconds, summed over prompts",
    )
    console.print(f"wrote {out}")
    return report


def _mode(layer: int, draft_tokens: int) -> str:
    return f"draft {layer}, " + (f"{draft_tokens} tokens" if draft_tokens else "HF default")


def _chat_ids(tokenizer: Any, text: str) -> Any:
    import torch

    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return torch.tensor([tokenizer.encode(chat, add_special_tokens=False)])


def _call_counter(module: Any) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


class _Timed:
    def __init__(self, output: Any, prompt_len: int, seconds: float, target_forwards: int) -> None:
        self.output, self.seconds, self.target_forwards = output, seconds, target_forwards
        self.tokens = output.shape[1] - prompt_len

    def summary(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens / self.seconds,
            "target_forwards": self.target_forwards,
        }


def _timed(target: Any, ids: Any, settings: dict[str, Any], calls: list[int]) -> _Timed:
    import torch

    calls[0] = 0
    with torch.inference_mode():
        start = time.perf_counter()
        output = target.generate(ids, **settings)
        seconds = time.perf_counter() - start
    return _Timed(output, ids.shape[1], seconds, calls[0])


def _summarise(rows: list[dict[str, Any]], modes: list[str]) -> list[dict[str, Any]]:
    out = []
    plain = [r for r in rows if r["mode"] == "plain"]
    plain_seconds = sum(r["seconds"] for r in plain)
    for mode in ["plain", *modes]:
        mine = [r for r in rows if r["mode"] == mode]
        tokens, seconds = sum(r["tokens"] for r in mine), sum(r["seconds"] for r in mine)
        identical = [r.get("identical", True) for r in mine]
        out.append({
            "mode": mode,
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "speedup": plain_seconds / seconds if mode != "plain" else None,
            "median_prompt_speedup": statistics.median(r["speedup"] for r in mine) if mode != "plain" else None,
            # Plain decoding: one target forward per token (the first also reads the prompt).
            "tokens_per_target_forward": tokens / sum(r["target_forwards"] for r in mine),
            "identical": f"{sum(identical)}/{len(identical)}",
        })
    return out


if __name__ == "__main__":
    main()
