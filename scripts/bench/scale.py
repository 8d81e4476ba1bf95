"""Data-parallel scaling of `tune`: 1 process vs N processes (FSDP2, dp_shard=N), same global batch.

Each case is a fresh launch: 1 process runs the plain single-process trainer; N processes run under
torchrun on an N-way FSDP2 mesh (gloo on CPU, nccl on GPUs). Every process gets the same number of
threads (--threads), so N processes use N times the cores, as N GPUs would be N times the devices.
All cases tune the same exits on the same global batch (data.batch_size sequences of data.seq_len
tokens per step), so their tokens/s compare directly:

    speedup(N) = tokens/s(N) / tokens/s(1),   scaling efficiency(N) = speedup(N) / N

Per case: median step time over the timed steps (after --warmup untimed ones) on rank 0, global
tokens/s, and each rank's peak RSS during the timed steps over its RSS before them (loaded weights
are not counted; exit state, gradients, optimizer state and activations are), plus the peak itself.

    .venv/bin/python scripts/bench/scale.py [--nprocs 1,2] [--steps N] [--threads T] [--quick] [--out DIR]

On a machine whose cores are shared with other work the numbers are noisy; the load average is
recorded with them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    DEFAULT_OUT_DIR,
    CaseFailed,
    PeakMemory,
    machine_info,
    make_console,
    now_iso,
    print_table,
    rank_case_entry_point,
    run_ranks_in_subprocess,
    write_json,
)

CASE_TIMEOUT_S = 3600


def overrides(case: dict[str, Any], run_dir: Path) -> list[str]:
    return [
        f"recipe={case['recipe']}", f"model.dtype={case['dtype']}", f"data.seq_len={case['seq_len']}",
        f"data.batch_size={case['batch_size']}", "optim.grad_accum=1", "data.cache_hidden=false",
        f"train.steps={case['warmup'] + case['steps']}", "train.eval_every=0", "train.flat_patience=0",
        "train.checkpoint_every=0", "data.heldout_sequences=1", f"parallel.dp_shard={case['nproc']}",
        f"run_dir={run_dir}",
    ]


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Inside a case process (one rank): tune, timing each step and watching memory from the first timed one."""
    import torch

    torch.set_num_threads(case["threads"])
    from eetune.config import compose_config
    from eetune.stages import tune
    from eetune.train.trainer import Trainer

    memory = PeakMemory()
    times: list[float] = []

    def measured(step_fn):
        def train_step(self):
            if self.step == case["warmup"]:
                memory.__enter__()
            start = time.perf_counter()
            metrics = step_fn(self)
            if self.step >= case["warmup"]:
                times.append(time.perf_counter() - start)
            if self.step == case["warmup"] + case["steps"] - 1:
                memory.__exit__(None, None, None)
            return metrics
        return train_step

    Trainer.train_step = measured(Trainer.train_step)  # one Trainer, in one process or on a mesh
    with tempfile.TemporaryDirectory(prefix="eetune-scale-") as scratch:
        # Every rank composes the same run_dir; rank 0's config is the one used.
        tune.run(compose_config("tune", overrides(case, Path(scratch) / "run")))
    window = memory.window
    return {"step_seconds": times, "peak_rss_mib": window.peak_rss_mib, "peak_delta_mib": window.peak_delta_mib,
            "rss_before_mib": window.rss_before_mib}


def launch(case: dict[str, Any]) -> dict[str, Any]:
    """Run one case in fresh processes (torchrun for N > 1, a plain process for 1); its per-rank results."""
    try:
        per_rank = run_ranks_in_subprocess(Path(__file__), case, case["nproc"], threads=case["threads"],
                                           timeout_s=CASE_TIMEOUT_S, plain_single=True)
    except CaseFailed as exc:
        raise RuntimeError(str(exc)) from None
    step = statistics.median(per_rank[0]["step_seconds"])
    tokens = case["batch_size"] * case["seq_len"]
    return {
        **case, "tokens_per_step": tokens, "median_step_s": step, "tokens_per_s": tokens / step, "ranks": per_rank,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", default="1,2", help="process counts to compare, the first is the baseline")
    parser.add_argument("--recipe", default="smollm2_135m_quickstart")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batch-size", type=int, default=8, help="global sequences per step (a multiple of each N)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--quick", action="store_true", help="a short check: 4 x 64 tokens, 2 timed steps")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.seq_len, args.steps = 4, 64, 2
    nprocs = [int(n) for n in args.nprocs.split(",")]

    console = make_console()
    cases = [
        {"nproc": n, "threads": args.threads, "recipe": args.recipe, "dtype": args.dtype,
         "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup}
        for n in nprocs
    ]
    results = []
    for case in cases:
        console.print(f"[bold]{case['nproc']} process(es)[/] x {case['threads']} thread(s) ...")
        results.append(launch(case))
    base = results[0]
    for result in results:
        speedup = result["tokens_per_s"] / base["tokens_per_s"]
        result["speedup"] = speedup
        result["scaling_efficiency"] = speedup / (result["nproc"] / base["nproc"])

    rows = [
        [f"{r['nproc']} x {r['threads']} thr", f"{r['median_step_s']:.2f}", f"{r['tokens_per_s']:,.0f}",
         f"{r['speedup']:.2f}x", f"{r['scaling_efficiency']:.0%}",
         " / ".join(f"{rank['peak_delta_mib']:.0f}" for rank in r["ranks"]),
         " / ".join(f"{rank['peak_rss_mib']:.0f}" for rank in r["ranks"])]
        for r in results
    ]
    print_table(
        console, f"tune scaling, {args.recipe} {args.dtype}, {args.batch_size} x {args.seq_len} tokens per step "
                 f"(FSDP2 dp_shard=N)",
        ["processes", "step s", "tokens/s", "speedup", "efficiency", "step peak MiB / rank", "peak RSS MiB / rank"],
        rows, caption="step peak: peak RSS during the timed steps minus RSS before them, per rank",
    )
    out = write_json(args.out / "scale.json", {
        "benchmark": "scale", "created": now_iso(), "machine": machine_info(), "args": vars(args) | {"out": str(args.out)},
        "results": results,
    })
    console.print(f"wrote {out}")


if __name__ == "__main__" and not rank_case_entry_point(run_case):
    main()
