"""Tensor parallel for decoding and evaluation: Megatron-style shards as plain tensors (as gpt-fast).

Tuning shards with DTensor plans (eetune.parallel.parallelize). Decoding drives blocks weight by
weight (eetune.infer.fast_block) and through our own KV caches, so here each rank keeps plain
local slices of the same plan instead:

- attention: q/k/v by heads (column slices), output_proj by the same heads (row slices of its
  input), head counts made local (torchtune's `prepare_mha_for_tp`), so the KV caches hold this
  rank's heads only;
- MLP (backbone blocks, `mlp` exits, `layer` exits' blocks): w1/w3 by hidden units, w2 by the
  same units;
- after each row-sliced projection the partial sums are all-reduced over the tp group (a forward
  hook on the module; `FastBlock` reads `tp_group` and reduces itself);
- vocabulary heads (the LM head and exits' own heads) by vocabulary rows, as tuning's plan splits
  them; every rank gathers the whole logits (`vocab_split`, read by `eetune.exits.head_logits`),
  so every rank takes the same exit, draft and sampling decisions from the same numbers. A head
  tied to the embeddings is a view of this rank's rows of them: it costs no memory;
- embeddings and norms stay whole on every rank.

A split parameter records into how many shards it was split (`tp_shards`), so cost models that
count the parameters streamed (the adaptive draft schedule) count the whole model's, as in one
process, and decide alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel
from torchtune.modules import TiedLinear, TransformerSelfAttentionLayer
from torchtune.training import prepare_mha_for_tp

from eetune.errors import EetuneError
from eetune.exits import EarlyExitModel, get_exit_arch, lm_head_weight
from eetune.parallel.parallelize import block_tp_plan

# Where a block's linears are split: the styles of tuning's plan (torchtune's Llama plan).
_BLOCK_PLAN = {name: "colwise" if isinstance(style, ColwiseParallel) else "rowwise"
               for name, style in block_tp_plan().items()}


def shard_block(block: TransformerSelfAttentionLayer, mesh: DeviceMesh) -> None:
    """Keep this rank's heads and hidden units of one transformer block, in place."""
    try:
        prepare_mha_for_tp(block, mesh)
    except ValueError as exc:
        raise EetuneError(f"parallel.tp={mesh.size()} does not fit this model: {exc}") from None
    group = mesh.get_group()
    for name, style in _BLOCK_PLAN.items():
        _shard_linear(block.get_submodule(name), style, group)
    block.tp_group = group  # read by eetune.infer.fast_block


def shard_exits(model: EarlyExitModel, mesh: DeviceMesh) -> None:
    """Split every exit's body as its arch's tensor-parallel plan says; norms stay whole."""
    for exit_module in model.exits.values():
        arch = get_exit_arch(exit_module.spec.arch)
        for name, style in arch.tp_plan.items():
            _shard_linear(exit_module.get_submodule(name), style, mesh.get_group())
        if arch.block is not None:
            shard_block(exit_module.get_submodule(arch.block), mesh)


def shard_heads(model: EarlyExitModel, mesh: DeviceMesh, *, exits: bool = True) -> None:
    """Split the LM head and (with `exits`) every exit's own head by vocabulary rows; the embeddings
    stay whole."""
    backbone, group = model.backbone, mesh.get_group()
    tied = isinstance(backbone.output, TiedLinear)
    backbone.output = _vocab_rows(lm_head_weight(backbone), group, view=tied)
    for exit_module in model.exits.values() if exits else ():
        if exit_module.head is not None:
            exit_module.head = _vocab_rows(exit_module.head.weight, group, view=False)


class VocabSplit:
    """How a head is split by vocabulary: `rows` rows per rank (the last padded with zeros)."""

    def __init__(self, group: dist.ProcessGroup, vocab: int) -> None:
        self.group, self.vocab = group, vocab
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.rows_per_rank = -(-vocab // self.size)
        self.start = self.rank * self.rows_per_rank

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """Every rank's logits [..., rows_per_rank] -> the whole vocabulary's [..., vocab]."""
        parts = [torch.empty_like(logits) for _ in range(self.size)]
        dist.all_gather(parts, logits.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab]

    def rows(self, local: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Whole rows of the head for token `ids`, each from the rank that holds it."""
        mine = (ids >= self.start) & (ids < self.start + self.rows_per_rank)
        out = torch.zeros(ids.numel(), local.shape[1], dtype=local.dtype, device=local.device)
        out[mine] = local[ids[mine] - self.start]
        dist.all_reduce(out, group=self.group)  # each row is non-zero on one rank only
        return out


def _vocab_rows(weight: torch.Tensor, group: dist.ProcessGroup, *, view: bool) -> nn.Linear:
    """This rank's rows of head `weight` as a linear whose output is gathered; `view`: keep a view
    of `weight` (the embeddings, which stay whole) rather than a copy (the rest of it is freed)."""
    split = VocabSplit(group, weight.shape[0])
    local = weight[split.start : split.start + split.rows_per_rank]
    if local.shape[0] < split.rows_per_rank:  # the last rank of an uneven split
        pad = local.new_zeros(split.rows_per_rank - local.shape[0], weight.shape[1])
        local = torch.cat([local, pad])
    head = nn.Linear(weight.shape[1], split.rows_per_rank, bias=False, device="meta")
    head.weight = nn.Parameter(local if view else local.clone(), requires_grad=False)
    head.weight.tp_shards = split.size
    head.weight.vocab_split = split
    head.register_forward_hook(lambda _module, _inputs, logits: split.gather(logits))
    return head



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

