"""Helpers shared by the benchmarks in scripts/bench/.

- `machine_info()`: what the numbers were measured on (CPU, threads, versions, load).
- `write_json()`: results are renamed into place, so a reader never sees half a file.
- `make_console()` + `print_table()`: one rich table from plain rows of cells.
- `hf_greedy_generate()`: the Hugging Face transformers `generate` baseline, timed per token.
- `run_case_in_subprocess()` + `case_entry_point()` + `PeakMemory`: each benchmark case runs in
  a fresh Python process, so one case's allocations (or memory the allocator keeps cached after
  it) never hide or inflate another case's peak.

A benchmark script using the case protocol starts with
`if case_entry_point(run_one_case): sys.exit(0)` and calls
`run_case_in_subprocess(Path(__file__), case)` for each case; the case dict must be JSON.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from eetune.rundir import atomic_write, atomic_write_json, git_revision, package_versions

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT_DIR = REPO_ROOT / "runs" / "bench"
CASE_FLAG = "--bench-case"  # argv[1] of a case subprocess: argv = [script, CASE_FLAG, case_json, result_path]
_KIB_PER_MIB = 1024


# --- results -----------------------------------------------------------------------------------


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def machine_info() -> dict[str, Any]:
    """What a benchmark ran on; the load average matters because the machine may be shared."""
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_total_mib": _meminfo_mib("MemTotal"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average_1_5_15min": list(os.getloadavg()),
        "packages": package_versions(),
        "git_revision": git_revision(),
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _meminfo_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / _KIB_PER_MIB
    except OSError:
        pass
    return None


def write_json(path: Path, data: Any) -> Path:
    """Write `data` as indented JSON at `path` atomically (temp file + rename)."""
    atomic_write_json(Path(path), data)
    return Path(path)


def plot_per_exit(
    out: Path, layers: Sequence[Any], curves: Sequence[tuple[str, Callable[[Any], list[tuple[float, float]]]]],
    *, xlabel: str, ylabel: str, legend_size: int = 7,
) -> Path:
    """One panel per exit layer, one line per (label, points_of(layer)) curve; a PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(layers), figsize=(3.8 * len(layers), 3.6), sharey=True, squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for label, points_of in curves:
            points = points_of(layer)
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, label=label)
        ax.set_title(f"exit {layer}")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=legend_size)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out


def make_console() -> Console:
    """The terminal's width on a terminal; 120 columns when output goes to a log or pipe,
    where rich would otherwise squeeze tables into 80."""
    return Console() if sys.stdout.isatty() else Console(width=120)


def print_table(
    console: Console,
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    caption: str | None = None,
    left_columns: int = 1,
) -> None:
    """A rich table; the first `left_columns` columns are labels, the rest right-aligned numbers."""
    table = Table(title=title, caption=caption, caption_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < left_columns else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


# --- the transformers baseline -------------------------------------------------------------------


def hf_greedy_generate(
    checkpoint_dir: Path, dtype: str, device: str = "cpu"
) -> Callable[[list[int], int], tuple[list[int], float]]:
    """transformers `generate` on a checkpoint dir: run(ids, n) decodes exactly n greedy tokens and
    returns them with the decode seconds after the first (timed with a streamer; prefill excluded)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    hf = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=getattr(torch, dtype)).to(device).eval()

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value) -> None:  # called with the prompt first, then once per new token
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    def run(ids: list[int], n: int) -> tuple[list[int], float]:
        clock = Clock()
        with torch.inference_mode():
            out = hf.generate(
                torch.tensor([ids], device=device), max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock,
                pad_token_id=0,
            )
        return out[0, len(ids):].tolist(), clock.stamps[-1] - clock.stamps[1]

    return run


# --- memory, measured inside a case process -----------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])  # e.g. "VmRSS:   123456 kB"
    raise RuntimeError(f"/proc/self/status has no {field} line (this needs Linux)")


def current_rss_mib() -> float:
    return _status_kib("VmRSS") / _KIB_PER_MIB


def _ru_maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def release_free_memory() -> None:
    """Collect garbage and return the allocator's free pages, so RSS counts live memory only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS may keep some freed memory, which only lowers the measured delta


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS marks (VmHWM, and ru_maxrss while no thread has exited)
    from the current RSS (Linux >= 4.0). False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class MemoryWindow:
    rss_before_mib: float  # VmRSS just before the block
    peak_rss_mib: float  # highest RSS while the block ran
    ru_maxrss_mib: float  # getrusage's process peak, read after the block
    peak_source: str

    @property
    def peak_delta_mib(self) -> float:
        """What the block itself needed at its peak, over what was resident before it."""
        return self.peak_rss_mib - self.rss_before_mib

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak_delta_mib": self.peak_delta_mib}


class PeakMemory:
    """`with PeakMemory() as memory: ...` then `memory.window`: peak RSS over the block.

    Loading a model usually peaks higher than what follows, so the process-lifetime peak
    (ru_maxrss) alone would hide the block's peak: the peak marks are reset at the start.
    """

    def __init__(self) -> None:
        self.window: MemoryWindow | None = None
        self._rss_before_kib = 0
        self._maxrss_before_kib = 0
        self._reset = False

    def __enter__(self) -> PeakMemory:
        release_free_memory()
        self._reset = _reset_peak_rss()
        self._rss_before_kib = _status_kib("VmRSS")
        self._maxrss_before_kib = _ru_maxrss_kib()
        return self

    def __exit__(self, *exc_info: object) -> None:
        hwm_kib, maxrss_kib = _status_kib("VmHWM"), _ru_maxrss_kib()
        # ru_maxrss is the block's peak only if it rose during the block.
        grew = maxrss_kib > self._maxrss_before_kib
        if self._reset:
            peak_kib, source = max(hwm_kib, maxrss_kib if grew else 0), "VmHWM/ru_maxrss reset at block start"
        elif grew:
            peak_kib, source = maxrss_kib, "ru_maxrss (rose during the block)"
        else:
            peak_kib, source = maxrss_kib, "ru_maxrss upper bound (the process peaked before the block)"
        self.window = MemoryWindow(
            rss_before_mib=self._rss_before_kib / _KIB_PER_MIB,
            peak_rss_mib=peak_kib / _KIB_PER_MIB,
            ru_maxrss_mib=maxrss_kib / _KIB_PER_MIB,
            peak_source=source,
        )


# --- one case per subprocess --------------------------------------------------------------------


class CaseFailed(RuntimeError):
    """A case subprocess exited non-zero or wrote no result; the message ends with its stderr tail."""


def run_case_in_subprocess(
    script: Path, case: Mapping[str, Any], *, timeout_s: float | None = None, tail_lines: int = 25
) -> dict[str, Any]:
    """Run `script` in a fresh interpreter on `case`; return the dict its case function returned."""
    with tempfile.TemporaryDirectory(prefix="eetune-bench-") as scratch:
        result_path = Path(scratch) / "result.json"
        command = [sys.executable, str(Path(script).resolve()), CASE_FLAG, json.dumps(dict(case)), str(result_path)]
        try:
            proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise CaseFailed(f"case {dict(case)} ran past {timeout_s} s") from exc
        if proc.returncode != 0 or not result_path.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-tail_lines:])
            raise CaseFailed(f"case {dict(case)} failed (exit code {proc.returncode}):\n{tail}")
        return json.loads(result_path.read_text())


def case_entry_point(run_case: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """In a case subprocess (argv from `run_case_in_subprocess`): run the case, write its result
    and return True. In the parent process: do nothing and return False."""
    if len(sys.argv) != 4 or sys.argv[1] != CASE_FLAG:
        return False
    case = json.loads(sys.argv[2])
    write_json(Path(sys.argv[3]), run_case(case))
    return True


def run_ranks_in_subprocess(
    script: Path, case: Mapping[str, Any], nproc: int, *, threads: int = 1, timeout_s: float | None = None,
    tail_lines: int = 25, plain_single: bool = False,
) -> list[dict[str, Any]]:
    """Run `script` on `case` as `nproc` processes under torchrun (standalone); every rank's result, by rank.
    `plain_single`: one process runs without torchrun (a plain process, not a mesh of one)."""
    with tempfile.TemporaryDirectory(prefix="eetune-bench-") as scratch:
        prefix = Path(scratch) / "result"
        command = [sys.executable, str(Path(script).resolve()), CASE_FLAG, json.dumps(dict(case)), str(prefix)]
        if nproc > 1 or not plain_single:
            command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        try:
            proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise CaseFailed(f"case {dict(case)} ran past {timeout_s} s") from exc
        paths = sorted(Path(scratch).glob("result.rank*.json"))
        if proc.returncode != 0 or len(paths) != nproc:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-tail_lines:])
            raise CaseFailed(f"case {dict(case)} failed (exit code {proc.returncode}):\n{tail}")
        return sorted((json.loads(path.read_text()) for path in paths), key=lambda result: result["rank"])


def rank_case_entry_point(run_case: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """In a rank that `run_ranks_in_subprocess` started: run the case, write this rank's result (with
    its "rank") and return True. In the parent process: do nothing and return False."""
    if len(sys.argv) != 4 or sys.argv[1] != CASE_FLAG:
        return False
    rank = int(os.environ.get("RANK", "0"))
    write_json(Path(f"{sys.argv[3]}.rank{rank}.json"), {"rank": rank, **run_case(json.loads(sys.argv[2]))})
    return True
