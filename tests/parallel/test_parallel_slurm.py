"""A real Slurm runs the generic sbatch wrapper: a 2-process tune of the tiny model, to completion.

scripts/slurm_local.sh installs Debian's slurmctld/slurmd/munge (apt-get, once) and starts a private
single-node cluster whose state, config and munge socket all live in a temp dir; it is shut down
afterwards (scontrol shutdown, then the munged it started). Skipped, with the reason, only where
that cannot run: not root, or apt-get missing or unable to install the packages. With
EETUNE_REQUIRE_SLURM=1 (set by .ci/run) those are failures instead: CI must not lose its only
real-Slurm coverage silently.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from eetune.exits import load_exits

REPO = Path(__file__).resolve().parents[2]
LOCAL_SLURM = REPO / "scripts" / "slurm_local.sh"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


def unavailable(reason: str) -> None:
    """Skip for want of a prerequisite, or fail where Slurm is required (EETUNE_REQUIRE_SLURM=1)."""
    if os.environ.get("EETUNE_REQUIRE_SLURM") == "1":
        pytest.fail(f"EETUNE_REQUIRE_SLURM=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    """Environment for Slurm clients talking to a private single-node cluster."""
    if os.geteuid() != 0:
        unavailable("a local Slurm needs root (apt-get install, slurmctld/slurmd as root)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        unavailable("apt-get is not available to install slurmctld, slurmd and munge")
    install = subprocess.run(["bash", str(LOCAL_SLURM), "install"], capture_output=True, text=True, timeout=600)
    if install.returncode != 0:
        unavailable(f"apt-get could not install slurmctld, slurmd and munge: {install.stderr.strip()[-300:]}")
    # Not under pytest's private (0700) temp root: the munge user must reach its socket dir.
    directory = Path(tempfile.mkdtemp(prefix="eetune-slurm-"))
    directory.chmod(0o755)
    start = subprocess.run(["bash", str(LOCAL_SLURM), "start", str(directory)], capture_output=True, text=True,
                           timeout=120)
    try:
        assert start.returncode == 0, start.stderr
        conf = start.stdout.strip().rsplit("SLURM_CONF=", 1)[1]
        yield {**os.environ, "SLURM_CONF": conf}
    finally:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop", str(directory)], capture_output=True, timeout=120)
        shutil.rmtree(directory, ignore_errors=True)


def wait_for(job: str, env: dict[str, str], timeout_s: float = 600) -> dict[str, str]:
    """The job's final `scontrol show job` fields (polled each second: `sbatch --wait` polls slower)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, env=env)
        fields = dict(item.split("=", 1) for item in shown.stdout.split() if "=" in item)
        if fields.get("JobState") in TERMINAL_STATES:
            return fields
        time.sleep(1)
    raise AssertionError(f"slurm job {job} did not finish in {timeout_s} s")


def test_sbatch_wrapper_runs_a_two_process_tune(slurm, tiny_base_model, tmp_path):
    corpus = tmp_path / "corpus.txt"
    from pydoc_data.topics import topics

    corpus.write_text(topics["assignment"][:6000])
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    env = {
        **slurm,
        "EETUNE_PYTHON": sys.executable, "EETUNE_NPROC": "2", "EETUNE_LOG_DIR": str(logs),
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    submit = subprocess.run(
        ["sbatch", "--parsable", f"--output={tmp_path}/job-%j.out", str(REPO / "scripts" / "slurm" / "tune.sbatch"),
         f"model.checkpoint_dir={tiny_base_model.checkpoint_dir}", "model.dtype=float32", "data=text",
         f"data.path={corpus}", "data.seq_len=32", "data.batch_size=4", "data.cache_hidden=false",
         "data.heldout_sequences=2", "exits.layers=[1,2,3]", "loss.ce_target=labels", "loss.kd_alpha=0",
         "exits.confidence=none", "train.steps=3", "train.eval_every=0", "train.flat_patience=0",
         f"run_dir={run_dir}"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
    )
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    fields = wait_for(job, env)
    output = (tmp_path / f"job-{job}.out").read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", output[-4000:]

    assert f"eetune: job {job}: 1 node(s) x 2 process(es)" in output
    assert "mesh pp=1 x dp_replicate=1 x dp_shard=2 x tp=1 on 2 processes (cpu)" in output
    assert "tuned exits written to" in output
    assert f"eetune: job {job} finished" in output
    # Each rank's own log, per job.
    rank_logs = sorted(p.relative_to(logs / job).parts[-2:] for p in (logs / job).rglob("stderr.log"))
    assert rank_logs == [("0", "stderr.log"), ("1", "stderr.log")]

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["tune"]["steps"] == 3 and manifest["tune"]["mesh"]["dp_shard"] == 2
    model = load_exits(run_dir, tiny_base_model.model, tiny_base_model.fingerprint)
    assert model.exit_layers == [1, 2, 3]


@pytest.mark.parametrize("required", [False, True])
def test_missing_slurm_skips_unless_required(tmp_path, required):
    """With no apt-get and no slurmctld on PATH the real-Slurm test skips, or fails when required."""
    env = {key: value for key, value in os.environ.items() if key != "EETUNE_REQUIRE_SLURM"}
    env["PATH"] = str(Path(sys.executable).parent)  # the venv's bin: neither apt-get nor slurmctld
    if required:
        env["EETUNE_REQUIRE_SLURM"] = "1"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider",
         f"{__file__}::test_sbatch_wrapper_runs_a_two_process_tune"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    if required:
        assert run.returncode == 1 and "1 error" in run.stdout, run.stdout[-2000:]
        assert "EETUNE_REQUIRE_SLURM=1 but" in run.stdout
    else:
        assert run.returncode == 0 and "1 skipped" in run.stdout, run.stdout[-2000:]
