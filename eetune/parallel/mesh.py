"""The device mesh: parallel degrees from config, process group, named mesh dims and their groups.

Dims, outermost first (torchtitan's order): `pp` (pipeline stages), `dp_replicate` (HSDP
replicas), `dp_shard` (FSDP2 shards), `tp` (tensor parallel, innermost so it stays in a node).
Every rank of a `tp` group holds the same rows of data; the `dp` ranks (replicate x shard) hold
different rows; the `pp` ranks hold different layers of the same rows.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from eetune.errors import EetuneError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


def launched_world_size() -> int:
    """Processes started together by torchrun (or Slurm via torchrun); 1 when run plainly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def under_launcher() -> bool:
    """True inside a process torchrun started (it sets these for every worker)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int

    @classmethod
    def from_config(cls, parallel: Any, world_size: int) -> ParallelDims:
        """Degrees from `parallel.*`, with `dp_shard=-1` taking what the world size leaves."""
        pp, dp_replicate, dp_shard, tp = (int(parallel.pp), int(parallel.dp_replicate),
                                          int(parallel.dp_shard), int(parallel.tp))
        for name, value in (("pp", pp), ("dp_replicate", dp_replicate), ("tp", tp)):
            if value < 1:
                raise EetuneError(f"parallel.{name}={value} must be >= 1")
        others = pp * dp_replicate * tp
        if dp_shard == -1:
            if world_size % others:
                raise EetuneError(
                    f"the mesh pp={pp} x dp_replicate={dp_replicate} x tp={tp} (x dp_shard) needs a multiple of "
                    f"{others} processes but {world_size} were started: set parallel.nproc_per_node (or the "
                    "launcher's process count) to one"
                )
            dp_shard = world_size // others
        elif dp_shard < 1:
            raise EetuneError(f"parallel.dp_shard={dp_shard} must be >= 1, or -1 for what the world size leaves")
        dims = cls(pp, dp_replicate, dp_shard, tp)
        if dims.world_size != world_size:
            raise EetuneError(
                f"the mesh pp={pp} x dp_replicate={dp_replicate} x dp_shard={dp_shard} x tp={tp} needs "
                f"{dims.world_size} processes but {world_size} were started: set parallel.nproc_per_node "
                "(or the launcher's process count) to the product, or set parallel.dp_shard=-1"
            )
        return dims

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.dp:
            raise EetuneError(
                f"data.batch_size={batch_size} must be a multiple of the {self.dp} data-parallel ranks "
                "(parallel.dp_replicate x parallel.dp_shard): each takes an equal share of every micro-batch"
            )

    def describe(self) -> str:
        return " x ".join(f"{name}={getattr(self, name)}" for name in MESH_DIMS)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_DIMS}


@dataclass
class Topology:
    """This process's place in the mesh, and the groups it talks to."""

    dims: ParallelDims
    mesh: DeviceMesh
    device: torch.device
    dp_mesh: DeviceMesh  # dp_replicate x dp_shard flattened: ranks with different data rows

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def is_main(self) -> bool:
        return dist.get_rank() == 0

    @property
    def pp_rank(self) -> int:
        return self.mesh.get_local_rank("pp")

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank()

    @property
    def tp_rank(self) -> int:
        return self.mesh.get_local_rank("tp")

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("pp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.dp_mesh.get_group()

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("tp")

    @property
    def tp_mesh(self) -> Optional[DeviceMesh]:
        return self.mesh["tp"] if self.dims.tp > 1 else None

    @property
    def fsdp_mesh(self) -> Optional[DeviceMesh]:
        """The mesh FSDP2 shards over: 1-D FSDP, 2-D (replicate, shard) HSDP, or None without dp."""
        if self.dims.dp == 1:
            return None
        if self.dims.dp_replicate == 1:
            return self.mesh["dp_shard"]
        return self.mesh["dp_replicate", "dp_shard"]

    def sum_over_data(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over every rank that holds other rows or other exits (dp and pp), in place."""
        if self.dims.dp > 1:
            dist.all_reduce(tensor, group=self.dp_group)
        if self.dims.pp > 1:
            dist.all_reduce(tensor, group=self.pp_group)
        return tensor


def backend_for(device: torch.device, choice: str = "auto") -> str:
    if choice != "auto":
        return choice
    return "nccl" if device.type == "cuda" else "gloo"


def init_topology(parallel: Any, model_device: str, timeout_s: float = 1800.0) -> Topology:
    """Join (or start) the process group and build the named mesh for `parallel.*`.

    On CUDA each process takes GPU `LOCAL_RANK`; on CPU every process uses the CPU.
    """
    world_size = launched_world_size()
    dims = ParallelDims.from_config(parallel, world_size)
    device = torch.device(model_device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EetuneError(f"model.device={model_device} but CUDA is not available here; use model.device=cpu")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend_for(device, parallel.backend), timeout=dt.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    mesh = init_device_mesh(device.type, tuple(getattr(dims, d) for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)
    # One group over both data dims (torchtitan flattens them the same way).
    dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    return Topology(dims=dims, mesh=mesh, device=device, dp_mesh=dp_mesh)


@contextlib.contextmanager
def mesh_session(parallel: Any, model_device: str) -> Iterator[Topology]:
    """`init_topology` for one stage run; the process group it started ends with it."""
    owns_group = not dist.is_initialized()
    topology = init_topology(parallel, model_device)
    try:
        yield topology
    finally:
        if owns_group:
            dist.destroy_process_group()


def from_rank0(value: Any) -> Any:
    """Rank 0's `value` (any picklable object) on every rank: for choices made from timings,
    which differ from rank to rank, where every rank must then do the same thing."""
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
