"""`eetune tune`: train only the exits, backbone frozen, resumably, in one process or on a device mesh.

The stage checks the config and run dir, then picks the `Trainer`'s strategy: one plain process,
or a mesh (`parallel.nproc_per_node` > 1 re-launches itself under torchrun, whose workers re-enter
this `run`; under a launcher, this process is one rank).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console

from eetune.config.schema import EetuneConfig
from eetune.console import make_console
from eetune.data import load_tuning_data
from eetune.errors import EetuneError
from eetune.models import load_base_model
from eetune.rundir import resolve_run_dir
from eetune.train.needs import build_model, run_needs
from eetune.train.results import TuneResult, result_from_run_dir
from eetune.train.run_dir import check_run_dir, finished_run, started_run_dir
from eetune.train.trainer import Trainer


def run(cfg: EetuneConfig, console: Optional[Console] = None) -> TuneResult:
    console = console or make_console()
    cfg.validate_tune()
    cfg.train.init_from = resolve_run_dir(cfg.train.init_from)
    run_dir = Path(cfg.run_dir)
    check_run_dir(cfg, run_dir)
    finished = finished_run(cfg, run_dir)
    if finished is not None:
        console.print(
            f"{run_dir} already finished at step {finished.steps}: nothing to do, nothing changed "
            "(resume with a larger train.steps to extend it)"
        )
        return finished
    from eetune.parallel import on_mesh

    if on_mesh(cfg):
        return _run_on_mesh(cfg, console)
    # Every start-up check (base model, data, init_from, exits) comes before the run dir is made.
    base = load_base_model(**vars(cfg.model))
    if base.dtype == torch.float16:
        raise EetuneError("tuning in float16 is not supported: use model.dtype=bfloat16 or float32")
    data = load_tuning_data(cfg.data, base.tokenizer, max_seq_len=cfg.model.max_seq_len)
    needs = run_needs(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, base)
    with started_run_dir(cfg, run_dir):
        return Trainer(cfg, base, model, data, run_dir, console, needs=needs).fit()


def _run_on_mesh(cfg: EetuneConfig, console: Console) -> TuneResult:
    import torch.distributed as dist

    from eetune.parallel.launch import relaunch
    from eetune.parallel.mesh import init_topology, under_launcher

    if int(cfg.parallel.nproc_per_node) > 1 and not under_launcher():
        relaunch(cfg, console)
        return result_from_run_dir(Path(cfg.run_dir))
    owns_group = not dist.is_initialized()
    topology = init_topology(cfg.parallel, cfg.model.device)
    try:
        from eetune.parallel.strategy import rank0_config

        cfg = rank0_config(cfg)
        if not topology.is_main:
            console = Console(quiet=True)
        return _tune_on_mesh(cfg, topology, console)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _tune_on_mesh(cfg: EetuneConfig, topology, console: Console) -> TuneResult:
    from eetune.parallel.load import build_stage_model, check_loaded
    from eetune.parallel.strategy import Mesh, on_rank0_first

    if cfg.data.cache_hidden:
        raise EetuneError("data.cache_hidden is single-process only: set data.cache_hidden=false for a mesh run")
    if cfg.model.dtype == "float16":
        raise EetuneError("tuning in float16 is not supported: use model.dtype=bfloat16 or float32")
    topology.dims.check_batch_size(int(cfg.data.batch_size))
    run_dir = Path(cfg.run_dir)
    on_rank0_first(lambda: check_run_dir(cfg, run_dir))
    needs = run_needs(cfg)
    console.print(f"mesh {topology.dims.describe()} on {topology.dims.world_size} processes ({topology.device.type})")
    torch.manual_seed(cfg.seed)  # before the exits are built, as in a single process
    stage = build_stage_model(cfg, topology, needs)
    check_loaded(stage)
    data = load_tuning_data(cfg.data, stage.base.tokenizer, max_seq_len=cfg.model.max_seq_len)
    heldout = data.heldout_batch(cfg.data.heldout_sequences)
    strategy = Mesh(cfg, topology, stage, data.seq_len, tuple(heldout.shape))
    trainer = Trainer(cfg, stage.base, stage.model, data, run_dir, console, strategy=strategy, needs=needs)
    # Every start-up check has passed on every rank: only now does rank 0 make the run dir.
    with started_run_dir(cfg, run_dir) if topology.is_main else contextlib.nullcontext():
        return trainer.fit()
