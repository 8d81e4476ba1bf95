"""Tensor parallel for decoding and evaluation: Megatron-style shards as plain tensors (as gpt-fast).

Tuning shards with DTensor plans (eetune.parallel.parallelize). Decoding drives blocks weight by
weight (eetune.infer.fast_block) and through our own KV caches, so here each rank keeps plain
local slices instead:

- attention: q/k/v by heads (column slices), output_proj by the same heads (row slices of its
  input), head counts made local, so the KV caches hold this rank's heads only;
- MLP (backbone blocks, `mlp` exits, `layer` exits' blocks): w1/w3 by hidden units, w2 by the
  same units;
- after each row-sliced projection the partial sums are all-reduced over the tp group (a forward
  hook on the module; `FastBlock` reads `tp_group` and reduces itself);
- embeddings, norms and vocabulary heads stay whole on every rank, so every rank computes the
  same logits from the same hidden state and takes the same exit, draft and sampling decisions.

A split parameter records into how many shards it was split (`tp_shards`), so cost models that
count the parameters streamed (the adaptive draft schedule) count the whole model's, as in one
process, and decide alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchtune.modules import MultiHeadAttention, TransformerSelfAttentionLayer

from eetune.errors import EetuneError
from eetune.exits import EarlyExitModel, get_exit_arch

# Where a block's linears are split (torchtune names; the same split as torchtune's Llama TP plan).
_BLOCK_PLAN = {
    "attn.q_proj": "colwise", "attn.k_proj": "colwise", "attn.v_proj": "colwise", "attn.output_proj": "rowwise",
    "mlp.w1": "colwise", "mlp.w3": "colwise", "mlp.w2": "rowwise",
}


def shard_block(block: TransformerSelfAttentionLayer, group: dist.ProcessGroup) -> None:
    """Keep this rank's heads and hidden units of one transformer block, in place."""
    size = dist.get_world_size(group)
    _local_heads(block.attn, size)
    for name, style in _BLOCK_PLAN.items():
        _shard_linear(block.get_submodule(name), style, group)
    block.tp_group = group  # read by eetune.infer.fast_block


def shard_exits(model: EarlyExitModel, group: dist.ProcessGroup) -> None:
    """Split every exit's body as its arch's tensor-parallel plan says; heads and norms stay whole."""
    for exit_module in model.exits.values():
        arch = get_exit_arch(exit_module.spec.arch)
        for name, style in arch.tp_plan.items():
            _shard_linear(exit_module.get_submodule(name), style, group)
        if arch.block is not None:
            shard_block(exit_module.get_submodule(arch.block), group)


def _local_heads(attn: MultiHeadAttention, size: int) -> None:
    if attn.num_heads % size or attn.num_kv_heads % size:
        raise EetuneError(
            f"parallel.tp={size} does not fit this model: {attn.num_heads} heads and {attn.num_kv_heads} KV heads "
            f"do not split {size} ways"
        )
    attn.num_heads //= size
    attn.num_kv_heads //= size
    attn.embed_dim //= size


def _shard_linear(linear: nn.Module, style: str, group: dist.ProcessGroup) -> None:
    if type(linear) is not nn.Linear:
        raise EetuneError(f"tensor-parallel decoding needs plain nn.Linear projections, got {type(linear).__name__}")
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    dim = 0 if style == "colwise" else 1
    if linear.weight.shape[dim] % size:
        raise EetuneError(
            f"parallel.tp={size} does not fit this model: a {tuple(linear.weight.shape)} projection does not split "
            f"{size} ways"
        )
    linear.weight = _keep(linear.weight.chunk(size, dim=dim)[rank], shards=size)
    if style == "colwise":
        if linear.bias is not None:
            linear.bias = _keep(linear.bias.chunk(size)[rank], shards=size)
        linear.out_features //= size
        return
    linear.in_features //= size
    if linear.bias is not None and rank != 0:
        linear.bias = _keep(torch.zeros_like(linear.bias))  # added once, by rank 0's partial sum
    linear.register_forward_hook(_all_reduce_output(group))


def _all_reduce_output(group: dist.ProcessGroup):
    def hook(_module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=group)
        return output

    return hook


def _keep(tensor: torch.Tensor, shards: int = 1) -> nn.Parameter:
    # A copy, so the full tensor the slice came from can be freed.
    param = nn.Parameter(tensor.contiguous().clone(), requires_grad=False)
    param.tp_shards = shards
    return param

