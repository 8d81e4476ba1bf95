"""What does one decode step of the continuous batch cost as rows are added? No HTTP, just the engine.

`scripts/bench/serve_load.py` measures the server end to end (clients, streaming, the event
loop, on the same cores); this isolates the decoding it batches. For each `--batch-sizes` value,
a `BatchScheduler` (what `eetune serve` decodes with) is filled with that many copies of one chat
prompt (greedy, the embedded SmolLM2-135M), then `--steps` steps are timed, `--repeats` times,
alternating batch sizes (and `--dtypes`) so slow drift in the machine's load spreads over all of
them. Reports ms per step, tokens/s (rows / step time) and both against batch 1 of the same
dtype, and with several dtypes each one's tokens/s against the first's at the same rows (which
dtype `model.dtype=auto` should pick for decoding); writes batch_step.json, batch_step.png
(tokens/s and step time against rows, one line per dtype) and prints the table.

    .venv/bin/python scripts/bench/batch_step.py [--batch-sizes 1,2,4,8,16] [--steps 24] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_OUT_DIR, machine_info, make_console, now_iso, print_table, write_json  # noqa: E402

from eetune.data.chat import build_prompt_ids  # noqa: E402
from eetune.exits import EarlyExitModel  # noqa: E402
from eetune.infer.engine import DecodeSettings, Engine  # noqa: E402
from eetune.infer.scheduler import BatchRequest, BatchScheduler  # noqa: E402
from eetune.models import load_base_model  # noqa: E402
from eetune.rundir import atomic_write  # noqa: E402

PROMPT = "Tell me about the sea, the tides and the creatures that live there."


def step_seconds(engine: Engine, prompt: list[int], rows: int, steps: int) -> float:
    """Mean seconds per step of a batch of `rows` identical greedy requests (after one warm-up step)."""
    scheduler = BatchScheduler(engine, max_batch_size=rows, max_seq_len=len(prompt) + steps + 2)
    for _ in range(rows):
        scheduler.admit(BatchRequest(list(prompt), DecodeSettings(max_new_tokens=steps + 2)))
    scheduler.step()
    start = time.perf_counter()
    for _ in range(steps):
        scheduler.step()
    return (time.perf_counter() - start) / steps


def plot(rows: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, (ax_tps, ax_ms) = plt.subplots(1, 2, figsize=(9, 3.5))
    for dtype in dtypes:
        mine = [r for r in rows if r["dtype"] == dtype]
        sizes = [r["batch_size"] for r in mine]
        line = ax_tps.plot(sizes, [r["tokens_per_s"] for r in mine], marker="o", label=dtype)[0]
        ax_tps.plot(sizes, [mine[0]["tokens_per_s"] * s for s in sizes], linestyle=":", color=line.get_color(),
                    label=f"{dtype}, linear in rows")
        ax_ms.plot(sizes, [r["ms_per_step"] for r in mine], marker="o", label=dtype)
    sizes = sorted({r["batch_size"] for r in rows})
    for ax, title in ((ax_tps, "tokens/s"), (ax_ms, "ms per step")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("rows in the batch")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax_tps.legend(fontsize=7)
    fig.suptitle(f"continuous batch decode step, SmolLM2-135M, {' vs '.join(dtypes)}", fontsize=10)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16")
    parser.add_argument("--steps", type=int, default=24, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per batch size (the median is kept)")
    parser.add_argument("--dtypes", default="float32", help="one or more of float32,bfloat16, measured side by side")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    dtypes = args.dtypes.split(",")
    for dtype in dtypes:
        if dtype not in ("float32", "bfloat16"):
            parser.error(f"--dtypes: {dtype!r} is not float32 or bfloat16")
    console = make_console()

    engines = {}
    for dtype in dtypes:
        base = load_base_model("smollm2_135m", dtype=dtype)
        engines[dtype] = Engine(EarlyExitModel(base.model, []))
    prompt = build_prompt_ids(base.tokenizer, PROMPT, chat=True)
    samples: dict[tuple[str, int], list[float]] = {(d, s): [] for d in dtypes for s in sizes}
    for _ in range(args.repeats):
        for size in sizes:
            for dtype in dtypes:
                samples[dtype, size].append(step_seconds(engines[dtype], prompt, size, args.steps))
    rows = []
    for dtype in dtypes:
        for size in sizes:
            seconds = statistics.median(samples[dtype, size])
            rows.append({"dtype": dtype, "batch_size": size, "ms_per_step": seconds * 1000,
                         "tokens_per_s": size / seconds, "samples_ms": [s * 1000 for s in samples[dtype, size]]})
    first = {(r["dtype"], r["batch_size"]): r for r in rows}
    for r in rows:
        one, reference = first[r["dtype"], sizes[0]], first[dtypes[0], r["batch_size"]]
        r["step_vs_batch_1"] = r["ms_per_step"] / one["ms_per_step"]
        r["tokens_per_s_vs_batch_1"] = r["tokens_per_s"] / one["tokens_per_s"]
        r[f"tokens_per_s_vs_{dtypes[0]}"] = r["tokens_per_s"] / reference["tokens_per_s"]

    args.out.mkdir(parents=True, exist_ok=True)
    settings = {"batch_sizes": sizes, "steps": args.steps, "repeats": args.repeats, "dtypes": dtypes,
                "prompt_tokens": len(prompt)}
    path = write_json(args.out / "batch_step.json",
                      {"when": now_iso(), "machine": machine_info(), "settings": settings, "rows": rows})
    png = plot(rows, args.out / "batch_step.png")
    print_table(console, f"continuous batch decode step ({', '.join(dtypes)}; {len(prompt)}-token prompt, greedy)",
                ["dtype", "rows", "ms/step", "tok/s", "step vs 1 row", "tok/s vs 1 row", f"tok/s vs {dtypes[0]}"],
                [[r["dtype"], str(r["batch_size"]), f"{r['ms_per_step']:.1f}", f"{r['tokens_per_s']:.1f}",
                  f"{r['step_vs_batch_1']:.2f}x", f"{r['tokens_per_s_vs_batch_1']:.2f}x",
                  f"{r[f'tokens_per_s_vs_{dtypes[0]}']:.2f}x"] for r in rows])
    console.print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
