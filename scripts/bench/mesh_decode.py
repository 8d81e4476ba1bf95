"""Decoding on a tensor/pipeline-parallel mesh vs one process: tokens/s, the weights each rank holds, peak memory.

Each case is a fresh torchrun launch of tp x pp processes (1 x 1 too, so every case takes the same
code path: `build_inference_model` on that mesh, gloo on CPU, nccl on GPUs) that decodes the same
prompts greedily with the full model. Per case: decode tokens/s on rank 0 (median over prompts,
after one untimed warm-up prompt), each rank's weight MiB (its slices and its stage's layers, the
whole embeddings; a head tied to them counted once) and peak RSS, and whether every case decoded
exactly the tokens of the first. On a CPU a mesh is expected to be slower (tp: two all-reduces per
layer and token through gloo; pp: the stages take turns, plus a hand-off per stage; processes share
the cores); what it buys is memory per rank.

    .venv/bin/python scripts/bench/mesh_decode.py [--meshes 1x1,3x1,1x2,1x3] [--tokens 32] [--dtype float32]

A mesh is `TPxPP`. SmolLM2-135M has 9 attention and 3 KV heads, so tp is 1 or 3 on it; 30 layers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from common import (
    DEFAULT_OUT_DIR,
    PeakMemory,
    machine_info,
    make_console,
    now_iso,
    print_table,
    rank_case_entry_point,
    run_ranks_in_subprocess,
    write_json,
)

PROMPTS = ("Tell me about owls.", "How do I bake bread?", "What is a prime number?", "Write a haiku about rain.")


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Inside a case process (one rank): load this rank's slices, decode every prompt, report."""
    import torch

    torch.set_num_threads(case["threads"])
    from eetune.config import compose_config
    from eetune.data.chat import build_prompt_ids, stop_token_ids
    from eetune.infer.engine import DecodeSettings, Engine
    from eetune.parallel.load import build_inference_model
    from eetune.parallel.mesh import mesh_session

    cfg = compose_config("generate", [f"model.dtype={case['dtype']}", f"parallel.tp={case['tp']}",
                                      f"parallel.pp={case['pp']}", "parallel.dp_shard=1"])
    memory = PeakMemory()
    with mesh_session(cfg.parallel, cfg.model.device) as topology, memory:
        base, model = build_inference_model(cfg.model, None, topology)
        engine = Engine(model)
        settings = DecodeSettings(max_new_tokens=case["tokens"], stop_ids=frozenset(stop_token_ids(base.tokenizer)))
        prompts = [build_prompt_ids(base.tokenizer, text, True, None) for text in PROMPTS]
        engine.generate(prompts[0], settings)  # warm-up
        results = [engine.generate(ids, settings) for ids in prompts]
        # By storage: a head that is a view of the embeddings is not counted twice; other stages' layers are meta.
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                    for p in model.parameters() if not p.is_meta}
        params = sum(storages.values()) / 2**20
    return {"tokens_per_s": [r.tokens_per_s for r in results], "tokens": [r.tokens for r in results],
            "param_mib": params, "peak_rss_mib": memory.window.peak_rss_mib}


def launch(case: dict[str, Any]) -> dict[str, Any]:
    per_rank = run_ranks_in_subprocess(Path(__file__), case, case["tp"] * case["pp"], threads=case["threads"],
                                       timeout_s=3600)
    return {**case, "tokens_per_s": statistics.median(per_rank[0]["tokens_per_s"]),
            "tokens": per_rank[0]["tokens"], "ranks_agree": all(r["tokens"] == per_rank[0]["tokens"] for r in per_rank),
            "ranks": [{k: r[k] for k in ("rank", "param_mib", "peak_rss_mib")} for r in per_rank]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meshes", default="1x1,3x1,1x2,1x3",
                        help="TPxPP meshes to compare, the first is the baseline")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per prompt (greedy, full model)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args()

    console = make_console()
    results = []
    for mesh in args.meshes.split(","):
        tp, pp = (int(n) for n in mesh.lower().split("x"))
        console.print(f"[bold]tp={tp} x pp={pp}[/] ...")
        started = time.perf_counter()
        results.append(launch({"tp": tp, "pp": pp, "tokens": args.tokens, "dtype": args.dtype,
                               "threads": args.threads}))
        results[-1]["wall_s"] = time.perf_counter() - started
    base = results[0]
    for r in results:
        r["speed_vs_first"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["same_tokens_as_first"] = r["tokens"] == base["tokens"]
    rows = [[f"tp={r['tp']} x pp={r['pp']}", f"{r['tokens_per_s']:.1f}", f"{r['speed_vs_first']:.2f}x",
             " / ".join(f"{rank['param_mib']:.0f}" for rank in r["ranks"]),
             " / ".join(f"{rank['peak_rss_mib']:.0f}" for rank in r["ranks"]),
             "yes" if r["same_tokens_as_first"] and r["ranks_agree"] else "NO"] for r in results]
    print_table(console, f"SmolLM2-135M {args.dtype}, greedy, {len(PROMPTS)} prompts x {args.tokens} tokens, "
                         f"{args.threads} thread(s) per process",
                ["mesh", "tok/s", "speed", "weights MiB / rank", "peak RSS MiB / rank", "same tokens"], rows)
    out = write_json(args.out / "mesh_decode.json", {
        "benchmark": "mesh_decode", "created": now_iso(), "machine": machine_info(),
        "args": vars(args) | {"out": str(args.out)}, "results": results,
    })
    console.print(f"wrote {out}")


if __name__ == "__main__" and not rank_case_entry_point(run_case):
    main()
