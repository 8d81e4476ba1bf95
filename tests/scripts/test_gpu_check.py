"""scripts/gpu_check.sh: its dry run checks arguments and commands on CPU, so the GPU day finds it working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
STEPS = ("pytest_cuda", "tune", "generate_full", "generate_early_exit", "generate_self_speculative", "decode")


def gpu_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_dry_run_finds_every_command_and_prints_the_steps(tmp_path: Path) -> None:
    out = tmp_path / "check"
    result = gpu_check("--dry-run", "--out", str(out), "--steps", "5")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert [line.split("]")[0][1:] for line in lines] == list(STEPS)
    tune = next(line for line in lines if line.startswith("[tune]"))
    assert "torch.distributed.run" in tune and "model.dtype=bfloat16" in tune and "train.steps=5" in tune
    assert all(str(out) in line for line in lines)
    assert "--device cuda" in lines[-1]
    assert not out.exists()  # a dry run writes nothing


def test_bad_arguments_and_a_python_without_the_project_fail_clearly(tmp_path: Path) -> None:
    for args, message in ((("--bogus",), "unknown argument '--bogus'"), (("--steps", "0"), "positive integer")):
        result = gpu_check(*args)
        assert result.returncode == 2 and message in result.stderr
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--python", str(broken)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "cannot import eetune.cli" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_real_run_without_cuda_refuses_before_writing(tmp_path: Path) -> None:
    result = gpu_check("--out", str(tmp_path / "check"))
    assert result.returncode == 2 and "no CUDA device" in result.stderr
    assert not (tmp_path / "check").exists()
