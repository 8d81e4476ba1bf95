"""How fast does `eetune data distill` write a corpus? Batched decoding against one prompt at a time.

The same prompts (topics x templates), sampled answers of up to `--new-tokens` tokens, on the
embedded SmolLM2-135M: the batch-1 loop distill first used (`infer.generate.generate` per
prompt, a fresh KV cache each), lock-step batches (`Engine.generate_batch`: a row that finished
early waits for its batch's longest answer) and continuous batching (`infer.scheduler`, what
distill uses now: a finished row takes the next prompt at once), at each `--batch-sizes`; with `--turns N`, also N-turn conversations as `distill.turns=N` decodes
them (each follow-up question answered with the conversation so far as its prompt).
Tokens/s counts generated tokens only; the ratio column is against the batch-1 loop.

    .venv/bin/python scripts/bench/distill_throughput.py [--prompts 64] [--batch-sizes 8,16,32,64] [--turns 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_OUT_DIR, machine_info, make_console, now_iso, print_table, write_json  # noqa: E402

from eetune.config.schema import DistillConfig  # noqa: E402
from eetune.exits import EarlyExitModel  # noqa: E402
from eetune.infer.engine import DecodeSettings, Engine  # noqa: E402
from eetune.infer.generate import generate  # noqa: E402
from eetune.infer.scheduler import BatchRequest, BatchScheduler, decode_all  # noqa: E402
from eetune.models import load_base_model  # noqa: E402
from eetune.stages import distill  # noqa: E402
from eetune.data.chat import build_prompt_ids, stop_token_ids  # noqa: E402


def conversations(base, texts: list[str], args: argparse.Namespace, batch_size: int) -> dict:
    """`args.turns`-turn conversations through distill's own decoder (follow-ups from its bundled list)."""
    d = DistillConfig(turns=args.turns, max_new_tokens=args.new_tokens, batch_size=batch_size)
    scheduler = BatchScheduler(Engine(EarlyExitModel(base.model, [])), max_batch_size=batch_size,
                               max_seq_len=distill.conversation_positions(d))
    decoder = distill.Decoder(scheduler, base.tokenizer, frozenset(stop_token_ids(base.tokenizer)), chat=True)
    follow_ups = distill.read_lines(distill.DEFAULT_FOLLOW_UPS, what="follow-up")
    start = time.perf_counter()
    starts = ((k, text, k, 0) for k, text in enumerate(texts))
    tokens = sum(n for _, _, n in decoder.converse(starts, d, follow_ups, seed=0))
    return {"case": f"continuous, batch {batch_size}, {args.turns} turns", "batch_size": batch_size,
            "prompts": len(texts), "turns": args.turns, "tokens": tokens, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64, help="prompts per case (the batch-1 loop uses 1/4)")
    parser.add_argument("--batch-sizes", default="8,16,32,64")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--turns", type=int, default=1, help="also decode conversations of this many turns")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args()
    console = make_console()

    base = load_base_model("smollm2_135m", dtype=args.dtype)
    tokenizer = base.tokenizer
    topics = distill.read_lines(distill.DEFAULT_TOPICS, what="topic")
    templates = distill.read_templates(distill.DEFAULT_TEMPLATES)
    texts = [t.format(topic=topic) for topic in topics for t in templates][:: len(templates) + 1]
    prompts = [build_prompt_ids(tokenizer, p, chat=True) for p in texts[: args.prompts]]
    stop_ids = frozenset(stop_token_ids(tokenizer))
    settings = DecodeSettings(max_new_tokens=args.new_tokens, temperature=0.7, top_p=0.95, seed=0, stop_ids=stop_ids)

    cases = []
    # The old loop is slow: a quarter of the prompts gives its rate well enough.
    subset = prompts[: max(args.prompts // 4, 1)]
    start = time.perf_counter()
    tokens = sum(
        len(generate(base.model, p, args.new_tokens, temperature=0.7, top_p=0.95, stop_ids=stop_ids, seed=i).tokens)
        for i, p in enumerate(subset)
    )
    cases.append({"case": "batch-1 loop (before)", "batch_size": 1, "prompts": len(subset), "tokens": tokens,
                  "seconds": time.perf_counter() - start})
    console.print(f"batch-1 loop: {tokens} tokens in {cases[-1]['seconds']:.1f} s")
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        engine = Engine(EarlyExitModel(base.model, []), max_batch_size=batch_size)
        start, tokens = time.perf_counter(), 0
        # (lock step: one seed for the batch; continuous: one per prompt)
        for s in range(0, len(prompts), batch_size):
            tokens += sum(len(r.tokens) for r in engine.generate_batch(prompts[s : s + batch_size], settings))
        cases.append({"case": f"lock step, batch {batch_size}", "batch_size": batch_size, "prompts": len(prompts),
                      "tokens": tokens, "seconds": time.perf_counter() - start})
        console.print(f"batch {batch_size}: {tokens} tokens in {cases[-1]['seconds']:.1f} s")
        scheduler = BatchScheduler(Engine(EarlyExitModel(base.model, [])), max_batch_size=batch_size,
                                   max_seq_len=max(len(p) for p in prompts) + args.new_tokens)
        start = time.perf_counter()
        requests = [BatchRequest(p, replace(settings, seed=i)) for i, p in enumerate(prompts)]
        tokens = sum(len(r.tokens) for r in decode_all(scheduler, requests))
        cases.append({"case": f"continuous, batch {batch_size}", "batch_size": batch_size, "prompts": len(prompts),
                      "tokens": tokens, "seconds": time.perf_counter() - start})
        console.print(f"continuous {batch_size}: {tokens} tokens in {cases[-1]['seconds']:.1f} s")
        if args.turns > 1:
            cases.append(conversations(base, texts[: args.prompts], args, batch_size))
            console.print(f"{cases[-1]['case']}: {cases[-1]['tokens']} tokens in {cases[-1]['seconds']:.1f} s")

    base_rate = cases[0]["tokens"] / cases[0]["seconds"]
    for case in cases:
        case["tokens_per_s"] = case["tokens"] / case["seconds"]
        case["vs_batch1_loop"] = case["tokens_per_s"] / base_rate
    write_json(args.out / "distill_throughput.json", {
        "benchmark": "distill_throughput", "created": now_iso(), "dtype": args.dtype, "new_tokens": args.new_tokens,
        "machine": machine_info(), "cases": cases,
    })
    print_table(
        console, f"distill throughput (SmolLM2-135M, {args.dtype}, sampled, up to {args.new_tokens} new tokens)",
        ["case", "prompts", "tokens", "s", "tokens/s", "vs batch-1 loop"],
        [[c["case"], str(c["prompts"]), str(c["tokens"]), f"{c['seconds']:.1f}", f"{c['tokens_per_s']:.1f}",
          f"{c['vs_batch1_loop']:.2f}x"] for c in cases],
    )
    console.print(f"wrote {args.out / 'distill_throughput.json'}")


if __name__ == "__main__":
    main()
