"""`eetune plan`: will a tune fit a cluster, and how fast will it run? Or (`plan.workload=serve`) will the
model decode on a mesh, and on which one? (the arithmetic: eetune.parallel.plan and serve_plan)"""

from __future__ import annotations

from typing import Optional

from rich.console import Console
from rich.table import Table

from eetune.config.schema import EetuneConfig
from eetune.console import make_console
from eetune.parallel.plan import GIB, RESERVED, Plan, make_plan
from eetune.parallel.serve_plan import ServePlan, make_serve_plan, smallest_mesh


def run(cfg: EetuneConfig, console: Optional[Console] = None) -> Plan | ServePlan:
    console = console or make_console(stderr=False)
    if cfg.plan.workload == "serve":
        return _serve(cfg, console)
    plan = make_plan(cfg)
    console.print(plan_table(plan))
    verdict = "[green]fits[/]" if plan.fits else "[red]does not fit[/]"
    arch = "/".join(sorted({spec.arch for spec in plan.specs}))
    console.print(
        f"{plan.model} with {len(plan.specs)} {arch} exits on {cfg.plan.nodes} x "
        f"{cfg.plan.gpus_per_node} x {cfg.plan.gpu_memory_gb:g} GB ({plan.dims.describe()}): {verdict}, "
        f"{plan.worst.total / GIB:.1f} of {plan.usable / GIB:.1f} GiB usable on the fullest rank "
        f"(stage {plan.worst.plan.stage}); ~{plan.tokens_per_s:,.0f} tokens/s, {plan.step_seconds:.2f} s per step "
        f"of {plan.tokens_per_step:,} tokens at {cfg.plan.mfu:.0%} of {cfg.plan.gpu_tflops:g} TFLOP/s"
    )
    return plan


def _serve(cfg: EetuneConfig, console: Console) -> ServePlan:
    plan = make_serve_plan(cfg)
    console.print(plan_table(plan))
    verdict = "[green]fits[/]" if plan.fits else "[red]does not fit[/]"
    smallest = smallest_mesh(cfg)
    where = (f"the smallest mesh that serves it: {smallest.describe()}, {smallest.worst.total / GIB:.1f} GiB on the "
             f"fullest rank" if smallest is not None else
             f"no mesh of {cfg.plan.nodes} x {cfg.plan.gpus_per_node} x {cfg.plan.gpu_memory_gb:g} GB serves it")
    console.print(
        f"{plan.model} with {len(plan.specs)} exits decoding {plan.batch_size} x {plan.context} positions on "
        f"{plan.describe()} of {cfg.plan.gpu_memory_gb:g} GB: {verdict}, {plan.worst.total / GIB:.1f} of "
        f"{plan.usable / GIB:.1f} GiB usable on the fullest rank (stage {plan.worst.plan.stage}); {where}"
    )
    return plan


def plan_table(plan: Plan | ServePlan) -> Table:
    """Memory per rank (GiB) by component, one column per pipeline stage."""
    mesh = plan.describe() if isinstance(plan, ServePlan) else plan.dims.describe()
    table = Table(title=f"{plan.model}: {plan.backbone_params / 1e9:.2f}B frozen, {plan.exit_params / 1e6:.1f}M exit "
                        f"parameters; per-rank GiB on {mesh}")
    table.add_column("")
    for stage in plan.stages:
        table.add_column(f"stage {stage.plan.stage}", justify="right")
    table.add_row("layers", *(f"{s.plan.first + 1}-{s.plan.last}" for s in plan.stages))
    table.add_row("exits", *(",".join(map(str, s.plan.exits)) or "-" for s in plan.stages))
    for key in plan.stages[0].memory:
        table.add_row(key, *(f"{s.memory[key] / GIB:.2f}" for s in plan.stages))
    table.add_row("total", *(f"[bold]{s.total / GIB:.2f}[/]" for s in plan.stages))
    table.add_row(f"usable ({1 - RESERVED:.0%} of GPU)", *(f"{plan.usable / GIB:.2f}" for _ in plan.stages))
    return table
