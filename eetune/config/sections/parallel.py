"""The `parallel` section (the device mesh `tune` runs on) and `plan` (the cluster it is sized for)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from eetune.config.checks import check_choices


@dataclass
class ParallelConfig:
    """The device mesh `tune` runs on (the README's "Scaling out"); world size = the product of the four.
    `generate`, `eval` and `serve` split the model over `tp` only (pp=1, no data-parallel ranks).

    Mesh dims, outermost first: pp (pipeline stages), dp_replicate (HSDP replicas), dp_shard
    (FSDP2 shards), tp (tensor parallel, innermost: keep it within a node).
    """

    dp_replicate: int = 1
    # -1: whatever the world size leaves after the other dims.
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    # Rows per pipeline micro-batch (pp > 1): each step's micro-batch goes through the stages
    # in chunks of this many sequences, so stages work on different chunks at once.
    pp_microbatch_size: int = 1
    # Build and run only layers 1..deepest exit (EE-LLM's "partial pipeline"; the whole backbone
    # when a loss needs the final layer). false builds every layer, so held-out agreement with
    # the final layer is reported as in a single process.
    partial: bool = True
    # > 1: `eetune tune` (generate, eval, serve) re-launches itself under torchrun with this many
    # processes (one node).
    # Under torchrun or Slurm (scripts/slurm/) the launcher has already started the processes.
    nproc_per_node: int = 1
    # auto: nccl on CUDA, gloo on CPU.
    backend: str = "auto"

    def validate(self) -> None:
        check_choices(self, "parallel")


@dataclass
class PlanConfig:
    """`eetune plan`: the cluster a mesh is sized for (per-rank memory and throughput estimate)."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    # Dense bf16 peak per GPU (A100: 312, H100 SXM: 989) and the fraction of it a step reaches.
    gpu_tflops: float = 312.0
    mfu: float = 0.4
    # tune: the memory and speed of a tuning step on parallel.*'s mesh. serve: the memory of
    # decoding on parallel.tp x parallel.pp ranks, and the smallest mesh that serves the model.
    workload: str = "tune"
    # serve: sequences decoding at once, and the positions each one's KV cache holds
    # (null: model.max_seq_len).
    batch_size: int = 8
    context: Optional[int] = None

    def validate(self) -> None:
        check_choices(self, "plan")
