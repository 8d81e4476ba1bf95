"""Start a mesh run's processes: `eetune tune ... parallel.nproc_per_node=N` re-launches under torchrun.

The parent resolves the config once (so every process sees the same run_dir, timestamps included),
writes it to a temporary file and runs torchrun's own entry point (`torch.distributed.run`,
standalone rendezvous on this node) on `python -m eetune.stages <stage> <config.yaml>`, which runs
the config's stage in every worker. Multi-node jobs start torchrun themselves (scripts/slurm/*.sbatch)
and call `eetune tune` directly.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf
from rich.console import Console

from eetune.errors import EetuneError
from eetune.parallel.mesh import Topology, mesh_session, under_launcher

if TYPE_CHECKING:
    from eetune.config.schema import EetuneConfig


@contextlib.contextmanager
def stage_ranks(cfg: EetuneConfig, console: Console) -> Iterator[Topology | None]:
    """Where a stage runs on its mesh. In a plain process: re-launch the stage under torchrun and
    yield None once every rank has finished (the caller returns). Under torchrun: yield this rank's
    place in the mesh; the process group ends with the block."""
    if not under_launcher():
        relaunch(cfg, console)
        yield None
        return
    with mesh_session(cfg.parallel, cfg.model.device) as topology:
        yield topology


def relaunch(cfg: EetuneConfig, console: Console) -> None:
    """Run `cfg`'s stage as `parallel.nproc_per_node` processes under torchrun; return when all have finished."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    nproc = int(cfg.parallel.nproc_per_node)
    fd, path = tempfile.mkstemp(prefix="eetune-mesh-", suffix=".yaml")
    os.close(fd)
    try:
        Path(path).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        args = get_args_parser().parse_args(
            ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "eetune.stages", cfg.stage, path]
        )
        console.print(f"launching {nproc} processes under torchrun")
        try:
            run(args)
        except SignalException as exc:  # Ctrl-C or a kill: torchrun has passed it on to the workers
            raise SystemExit(128 + int(exc.sigval)) from None
        except ChildFailedError as exc:
            codes = sorted({failure.exitcode for failure in exc.failures.values()})
            raise EetuneError(
                f"{len(exc.failures)} of {nproc} {cfg.stage} processes failed (exit code {', '.join(map(str, codes))}); "
                "their messages are above"
            ) from None
    finally:
        os.unlink(path)
