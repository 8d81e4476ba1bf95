"""Output that scripts read: with stdout/stderr captured (not a terminal), summaries, paths,
commands and verdicts are whole lines, however long."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def eetune(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # What rich would size a non-terminal by: 80 columns, as a pipe or log gets by default.
    for key in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "eetune.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def one_line_with(text: str, *pieces: str) -> str:
    """The single line holding every piece (fails when they are split over lines)."""
    lines = [line for line in text.splitlines() if all(piece in line for piece in pieces)]
    assert len(lines) == 1, f"no single line holds {pieces}:\n{text}"
    return lines[0]


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory) -> Path:
    # A long path, so that every line naming it is well over 80 columns.
    path = tmp_path_factory.mktemp("output") / ("a_rather_long_directory_name_for_paths_" * 2)
    path.mkdir()
    return path


def test_generate_summary_is_one_line(tiny_base_model):
    proc = eetune("generate", f"model.checkpoint_dir={tiny_base_model.checkpoint_dir}", "--no-chat",
                  "--prompt", "def f(x): return x", "-n", "40")
    line = one_line_with(proc.stderr, "40 tokens", "tok/s decode", "prefill", "mean layers 4.0/4", "exit layers {4: 40}",
                         "stopped by length")
    assert len(line) > 80


def test_augment_path_and_export_hf_command_are_one_line(tiny_base_model, long_dir):
    run_dir, out = long_dir / "run", long_dir / "bundle"
    proc = eetune("augment", f"model.checkpoint_dir={tiny_base_model.checkpoint_dir}", "exits.layers=[1,2]",
                  f"run_dir={run_dir}", "data.seq_len=32", "data.heldout_sequences=1")
    one_line_with(proc.stderr, f"exits written to {run_dir}")
    proc = eetune("export", "hf", f"run_dir={run_dir}", f"out={out}")
    line = one_line_with(proc.stderr, f"wrote {out}", "eetune generate")
    # The suggested command runs as printed.
    command = shlex.split(line[line.index("eetune generate"):])
    assert command[:2] == ["eetune", "generate"]
    assert f"model.checkpoint_dir={out}" in command and f"generate.run_dir={out}" in command


def test_plan_verdict_is_one_line():
    proc = eetune("plan", "recipe=llama2_70b_mlp", "exits.layers=[10,20,30,40,50,60,70,75]", "plan.nodes=2",
                  "data.batch_size=16", "optim.grad_accum=2")
    one_line_with(proc.stdout, "llama2_70b with 8 mlp exits on 2 x 8 x 80 GB", ": fits,", "GiB usable on the fullest rank",
                  "tokens/s", "TFLOP/s")
