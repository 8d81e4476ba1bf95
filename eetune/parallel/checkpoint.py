"""Checkpoints of a mesh run: portable tuned exits, and resumable sharded training state.

- Tuned exits: every shard is gathered into full tensors and rank 0 writes exactly the
  `exits.safetensors` + `manifest.json` a single-process tune writes, so a run tuned on any mesh
  loads in a single process (`load_exits`) or starts a run on any other mesh (`train.init_from`).
- Resumable state (`state/`): exit weights and AdamW state through torch.distributed.checkpoint
  (each rank writes its own shards; optimizer state flattened per parameter, so pipeline stages
  with different exits never collide), plus rank 0's `trainer.pt` (step, scheduler, data position,
  RNG) and `mesh.json`. It resumes under the same mesh only. Like the single-process state, it is
  staged in a fresh directory and renamed into place, so a crash leaves the old or the new state.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from eetune.errors import EetuneError
from eetune.exits.checkpoint import EXITS_FILE, FORMAT, MANIFEST_FILE
from eetune.parallel.mesh import Topology
from eetune.rundir import atomic_write, atomic_write_json
from eetune.train.state import MESH_FILE, STATE_DIR

_TRAINER = "trainer.pt"
_SHARDS = "dcp"
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def gather_exit_state(exits: nn.Module, topology: Topology) -> Optional[dict[str, torch.Tensor]]:
    """Full CPU tensors of every exit of every stage on rank 0 (None elsewhere). Collective."""
    full = {}
    for name, tensor in exits.state_dict().items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()  # collective over the tensor's own mesh (dp and tp)
        full[name] = tensor.detach().cpu()
    # One copy per stage travels: the rank at dp 0, tp 0 of each stage sends it.
    mine = full if topology.dp_rank == 0 and topology.tp_rank == 0 else None
    gathered: Optional[list] = [None] * dist.get_world_size() if topology.is_main else None
    dist.gather_object(mine, gathered, dst=0)
    if not topology.is_main:
        return None
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        merged.update(part or {})
    return merged


def write_exits(run_dir: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
    """`save_exits` for tensors gathered from a mesh: the same files, metadata and atomic writes."""
    tensors = {name: t.contiguous() for name, t in sorted(tensors.items())}
    metadata = {"format": FORMAT, "base_fingerprint": manifest["base_model"]["fingerprint"]}
    atomic_write(Path(run_dir) / EXITS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    atomic_write_json(Path(run_dir) / MANIFEST_FILE, manifest)


def save_mesh_state(
    run_dir: Path, topology: Topology, exits: nn.Module, optimizer: Optional[torch.optim.Optimizer],
    trainer: dict[str, Any],
) -> None:
    """Write `state/` for this mesh (collective); `trainer` is rank 0's non-tensor state."""
    run_dir = Path(run_dir)
    staging = run_dir / f".{STATE_DIR}.staging"
    if topology.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / _SHARDS).mkdir(parents=True)
    dist.barrier()
    dcp.save(_sharded_state(exits, optimizer), checkpoint_id=str(staging / _SHARDS))
    if topology.is_main:
        torch.save(trainer, staging / _TRAINER)
        (staging / MESH_FILE).write_text(json.dumps(topology.dims.as_dict()))
        final, old = run_dir / STATE_DIR, run_dir / f".{STATE_DIR}.old"
        if final.exists():
            # Rename the old state aside first: os.replace cannot replace a non-empty dir.
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_mesh_state(
    run_dir: Path, topology: Topology, exits: nn.Module, optimizer: Optional[torch.optim.Optimizer],
) -> dict[str, Any]:
    """Restore exits and optimizer shards in place (collective); return rank 0's trainer state."""
    directory = Path(run_dir) / STATE_DIR
    if not (directory / _TRAINER).is_file():
        # A crash between the two renames in save_mesh_state leaves only the old copy.
        directory = Path(run_dir) / f".{STATE_DIR}.old"
    check_same_mesh(directory, topology)
    state = _sharded_state(exits, optimizer)
    dcp.load(state, checkpoint_id=str(directory / _SHARDS))
    if state:
        set_model_state_dict(exits, state["exits"], options=_OPTIONS)
        set_optimizer_state_dict(exits, optimizer, state["optimizer"], options=_OPTIONS)
    return torch.load(directory / _TRAINER, weights_only=False)


def check_same_mesh(state_dir: Path, topology: Topology) -> None:
    path = Path(state_dir) / MESH_FILE
    if not path.is_file():
        raise EetuneError(
            f"{state_dir} holds single-process training state: resume it without a mesh "
            "(one process), or start a new run_dir"
        )
    saved = json.loads(path.read_text())
    if saved != topology.dims.as_dict():
        shown = " x ".join(f"{k}={v}" for k, v in saved.items())
        raise EetuneError(
            f"{state_dir} was saved on the mesh {shown}, not {topology.dims.describe()}: resume on the same mesh "
            "(its tuned exits.safetensors, once written, load on any mesh through train.init_from)"
        )


def _sharded_state(exits: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict[str, Any]:
    """This rank's part; empty on a pipeline stage without exits (it still joins the collectives)."""
    if optimizer is None:
        return {}
    return {
        "exits": get_model_state_dict(exits, options=_OPTIONS),
        "optimizer": get_optimizer_state_dict(exits, optimizer, options=_OPTIONS),
    }
