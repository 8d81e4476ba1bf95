"""Resumable training state under `<run_dir>/state/`, replaced atomically as a whole.

A checkpoint holds everything the next step depends on: exit weights, optimizer and
scheduler state, the data position, every RNG, and the step. It is written into a
fresh directory which then replaces `state/` by rename, so a crash at any moment leaves
either the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from eetune.errors import EetuneError

STATE_DIR = "state"
_EXITS = "exits.safetensors"
_TRAINER = "trainer.pt"
MESH_FILE = "mesh.json"  # in a mesh run's state/: the mesh its shards were saved on


@dataclass
class TrainerState:
    step: int  # optimizer steps completed
    exits: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    data: dict[str, Any]
    rng: dict[str, Any]
    extra: dict[str, Any]


def capture_rng() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_state(run_dir: Path, state: TrainerState) -> None:
    run_dir = Path(run_dir)
    staging = Path(tempfile.mkdtemp(prefix=".state.", dir=run_dir))
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.exits.items()}
        save_file(tensors, str(staging / _EXITS))
        torch.save(
            {
                "step": state.step,
                "optimizer": state.optimizer,
                "scheduler": state.scheduler,
                "data": state.data,
                "rng": state.rng,
                "extra": state.extra,
            },
            staging / _TRAINER,
        )
        final = run_dir / STATE_DIR
        old = None
        if final.exists():
            # Rename the old state aside first: os.replace cannot replace a non-empty dir.
            old = run_dir / f".{STATE_DIR}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(staging, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def has_state(run_dir: Path) -> bool:
    return (Path(run_dir) / STATE_DIR / _TRAINER).is_file() or (Path(run_dir) / f".{STATE_DIR}.old").is_dir()


def saved_step(run_dir: Path) -> int:
    """The step of the run dir's resumable state (a single-process or a mesh one), read cheaply."""
    for directory in (Path(run_dir) / STATE_DIR, Path(run_dir) / f".{STATE_DIR}.old"):
        if (directory / _TRAINER).is_file():
            # Memory-mapped: only the step is read, not the optimizer state.
            return int(torch.load(directory / _TRAINER, weights_only=False, mmap=True)["step"])
    raise EetuneError(f"{run_dir} has no training state to resume from (no {STATE_DIR}/{_TRAINER})")


def load_state(run_dir: Path) -> TrainerState:
    run_dir = Path(run_dir)
    directory = run_dir / STATE_DIR
    if not (directory / _TRAINER).is_file():
        # A crash between the two renames in save_state leaves only the old copy.
        directory = run_dir / f".{STATE_DIR}.old"
    if not (directory / _TRAINER).is_file():
        raise EetuneError(f"{run_dir} has no training state to resume from (no {STATE_DIR}/{_TRAINER})")
    payload = torch.load(directory / _TRAINER, weights_only=False)
    return TrainerState(exits=load_file(str(directory / _EXITS)), **payload)


def refuse_mesh_state(run_dir: Path) -> None:
    """For a single-process resume: state sharded by a mesh run cannot be read here."""
    path = Path(run_dir) / STATE_DIR / MESH_FILE
    if path.is_file():
        dims = json.loads(path.read_text())
        shown = " x ".join(f"{k}={v}" for k, v in dims.items())
        processes = math.prod(dims.values())
        raise EetuneError(
            f"{run_dir} was saved on a mesh of {processes} processes ({shown}): resume it with "
            f"parallel.nproc_per_node={processes} (or the same launcher), or start a new run_dir"
        )
