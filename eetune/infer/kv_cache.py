"""Static KV caches written by explicit position (gpt-fast style).

torchtune's `KVCache` appends at its own running counter and cannot be rolled back. Here an
entry lives at the sequence position it belongs to, so an early-exit engine can fill a
skipped layer's entries later and a speculative decoder rolls back by simply rewriting
positions; nothing in the cache tracks how much of it is valid, the caller does.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchtune.modules import TransformerDecoder


class LayerKVCache:
    """Keys and values of one attention layer, preallocated as [batch, kv_heads, max_seq_len, head_dim]."""

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    def write(self, input_pos: Tensor, k: Tensor, v: Tensor) -> None:
        """Store k, v ([b, kv_heads, s, head_dim]) at sequence positions input_pos: [s] shared by
        every row, or [b, s] for rows at positions of their own (continuous batching)."""
        if input_pos.dim() == 1:
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
            return
        rows = torch.arange(k.shape[0], device=input_pos.device)[:, None]
        self.k[rows, :, input_pos] = k.transpose(1, 2)
        self.v[rows, :, input_pos] = v.transpose(1, 2)

    def rows(self, start: int, end: int) -> LayerKVCache:
        """The cache of rows [start, end) as its own cache (a view: writes land here)."""
        view = LayerKVCache.__new__(LayerKVCache)
        view.k, view.v = self.k[start:end], self.v[start:end]
        return view

    def move_row(self, source: int, target: int, length: int | None = None) -> None:
        """Copy row `source`'s first `length` positions (default all) over row `target`
        (compacting a batch when a row leaves)."""
        end = self.max_seq_len if length is None else length
        self.k[target, :, :end].copy_(self.k[source, :, :end])
        self.v[target, :, :end].copy_(self.v[source, :, :end])

    def read(self, kv_len: int) -> tuple[Tensor, Tensor]:
        """Views of positions [0, kv_len): attention never streams the unused tail."""
        return self.k[:, :, :kv_len], self.v[:, :, :kv_len]

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()


def caches_for_model(
    model: TransformerDecoder,
    *,
    batch_size: int,
    max_seq_len: int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> list[LayerKVCache | None]:
    """One cache per decoder layer, in the model's own dtype and device unless given; None for a
    layer another pipeline stage runs (eetune.parallel.inference_pp)."""
    weight = model.tok_embeddings.weight
    pipeline = getattr(model, "layer_pipeline", None)
    return [
        LayerKVCache(
            batch_size,
            layer.attn.num_kv_heads,
            max_seq_len,
            layer.attn.head_dim,
            dtype=dtype or weight.dtype,
            device=device or weight.device,
        )
        if pipeline is None or pipeline.owns(index)
        else None
        for index, layer in enumerate(model.layers)
    ]
