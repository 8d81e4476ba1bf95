"""Apply tensor parallel, then FSDP2, to one pipeline stage (torchtitan's fixed order, in one place).

Tensor parallel (DTensor plans, torchtune's Llama plan for the backbone blocks):
- backbone blocks: q/k/v, w1/w3 column-wise, output_proj/w2 row-wise; attention head counts made
  local (`prepare_mha_for_tp`); activations between blocks stay replicated;
- embeddings: vocabulary-sharded (row-wise); the LM head (or the tied embedding) is thereby split
  over the vocabulary, which is what the vocabulary-parallel fused exit loss reads;
- exits: as their arch's record says (eetune.exits.archs: `tp_plan`, e.g. `mlp` exits like a block's
  MLP; a `block` like a backbone block), copied heads column-wise (vocabulary-parallel); norms and
  confidence estimators stay replicated.

FSDP2 (`fully_shard`, per block): every backbone block (frozen: sharded only to save memory) and
every exit (trainable; its gradients are summed, not averaged, over data-parallel ranks because the
loss is already divided by the global token count). Exits keep their parameters gathered from
forward to backward (`reshard_after_forward=False`): the fused loss reads their heads directly.
Embeddings, final norm and LM head are not FSDP-sharded (the exits read the LM head directly too);
in bf16 the exits compute in bf16 from fp32 master weights (MixedPrecisionPolicy).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torchtune.models.llama3 import base_llama_tp_plan
from torchtune.modules import TransformerDecoder
from torchtune.training import prepare_mha_for_tp

from eetune.errors import EetuneError
from eetune.exits import EarlyExitModel, get_exit_arch
from eetune.parallel.mesh import Topology
from eetune.parallel.pipeline import StagePlan

_BLOCK_PREFIX = "layers.*."
_STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


def block_tp_plan() -> dict:
    """torchtune's Llama plan for one transformer block (names relative to the block)."""
    return {key[len(_BLOCK_PREFIX):]: style for key, style in base_llama_tp_plan().items()
            if key.startswith(_BLOCK_PREFIX)}


def parallelize_stage(
    model: EarlyExitModel, plan: StagePlan, topology: Topology, *, bf16: bool,
    before_block: Optional[Callable[[int], None]] = None,
) -> None:
    """TP, then FSDP, over this stage's backbone blocks, embeddings/head and exits, in place.

    `before_block(i)` runs before block i is parallelised (the loader materialises it there, so
    only one block's full weights are resident at a time).
    """
    tp_mesh, fsdp_mesh = topology.tp_mesh, topology.fsdp_mesh
    backbone = model.backbone
    for index in plan.layer_indices:
        if before_block is not None:
            before_block(index)
        block = backbone.layers[index]
        if tp_mesh is not None:
            _tensor_parallel_block(block, tp_mesh)
        if fsdp_mesh is not None:
            fully_shard(block, mesh=fsdp_mesh)
    if tp_mesh is not None:
        _tensor_parallel_vocabulary(backbone, tp_mesh)
    exit_precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    for exit_module in model.exits.values():
        if tp_mesh is not None:
            _tensor_parallel_exit(exit_module, tp_mesh)
        if fsdp_mesh is not None:
            kwargs = {"mp_policy": exit_precision} if exit_precision is not None else {}
            fully_shard(exit_module, mesh=fsdp_mesh, reshard_after_forward=False, **kwargs)
            exit_module.set_gradient_divide_factor(1.0)
            exit_module.set_force_sum_reduction_for_comms(True)  # plain sums: gloo has no pre-multiplied sum


def _tensor_parallel_block(block: nn.Module, tp_mesh: DeviceMesh) -> None:
    _local_heads(block, tp_mesh)
    parallelize_module(block, tp_mesh, block_tp_plan())


def _local_heads(module: nn.Module, tp_mesh: DeviceMesh) -> None:
    try:
        prepare_mha_for_tp(module, tp_mesh)
    except ValueError as exc:
        raise EetuneError(f"parallel.tp={tp_mesh.size()} does not fit this model: {exc}") from None


def _tensor_parallel_vocabulary(backbone: TransformerDecoder, tp_mesh: DeviceMesh) -> None:
    """Shard the embedding table and the LM head over the vocabulary (the tied head follows its embedding)."""
    style: dict = {}
    if not backbone.tok_embeddings.weight.is_meta:  # loaded: first stage, or the tied LM head
        style["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate())
    if isinstance(backbone.output, nn.Linear) and not backbone.output.weight.is_meta:
        style["output"] = ColwiseParallel(output_layouts=Replicate())
    if style:
        parallelize_module(backbone, tp_mesh, style)


def _tensor_parallel_exit(exit_module: nn.Module, tp_mesh: DeviceMesh) -> None:
    arch = get_exit_arch(exit_module.spec.arch)
    style: dict = {name: _STYLES[kind]() for name, kind in arch.tp_plan.items()}
    if arch.block is not None:
        _local_heads(exit_module.get_submodule(arch.block), tp_mesh)
        style.update({f"{arch.block}.{name}": s for name, s in block_tp_plan().items()})
    if exit_module.head is not None:
        style["head"] = ColwiseParallel()  # vocabulary-parallel: the fused loss reads its row shard
    if style:
        parallelize_module(exit_module, tp_mesh, style)
