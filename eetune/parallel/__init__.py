"""Running on a device mesh: FSDP2, tensor and pipeline parallel tuning; tensor and pipeline parallel
decoding, evaluation and serving; torchrun and Slurm launch; planning."""

from __future__ import annotations

from typing import TYPE_CHECKING

from eetune.parallel.mesh import ParallelDims, launched_world_size, under_launcher

if TYPE_CHECKING:
    from eetune.config.schema import EetuneConfig


def on_mesh(cfg: EetuneConfig) -> bool:
    """Whether `tune` runs on a device mesh rather than in one plain process: with several
    processes, or in any process torchrun started, even alone (FSDP2 over a world of one, e.g.
    on one GPU: scripts/gpu_check.sh).

    Also checks the mesh fits the process count, so a single process asked for tp=2 fails clearly
    instead of silently running unsharded.
    """
    processes = launched_world_size() if under_launcher() else int(cfg.parallel.nproc_per_node)
    if processes < 1:
        from eetune.errors import EetuneError

        raise EetuneError(f"parallel.nproc_per_node={processes} must be >= 1")
    ParallelDims.from_config(cfg.parallel, processes)
    return processes > 1 or under_launcher()


def on_inference_mesh(cfg: EetuneConfig) -> bool:
    """`on_mesh` for decoding and evaluation, which split the model over `parallel.tp` x `parallel.pp`
    ranks and never by data: a mesh with data-parallel ranks is refused before any process starts."""
    if not on_mesh(cfg):
        return False
    processes = launched_world_size() if under_launcher() else int(cfg.parallel.nproc_per_node)
    dims = ParallelDims.from_config(cfg.parallel, processes)
    if dims.dp > 1:
        from eetune.errors import EetuneError

        raise EetuneError(
            f"{cfg.stage} on a mesh splits the model by tensor and pipeline parallel only, but the mesh is "
            f"{dims.describe()}: set parallel.tp x parallel.pp = {processes} (and parallel.dp_shard=1, "
            "parallel.dp_replicate=1)"
        )
    return True


__all__ = ["ParallelDims", "on_inference_mesh", "on_mesh"]
