"""The KV caches one batch size decodes with: the backbone's and each `layer` exit's own."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor

from eetune.exits.model import EarlyExitModel
from eetune.exits.archs import get_exit_arch
from eetune.infer.generate import Generator, Span
from eetune.infer.kv_cache import LayerKVCache


class DecodeCaches:
    """KV caches for one batch size: the backbone's (inside `gen`) and each `layer` exit's own."""

    def __init__(self, model: EarlyExitModel, batch_size: int, max_seq_len: int) -> None:
        self.gen = Generator(model.backbone, max_seq_len=max_seq_len, batch_size=batch_size)
        weight = model.backbone.tok_embeddings.weight
        self.exit_caches: dict[int, LayerKVCache] = {}
        for layer in model.exit_layers:
            exit_module = model.exit(layer)
            block = get_exit_arch(exit_module.spec.arch).block
            if block is not None:
                attn = exit_module.get_submodule(block).attn
                self.exit_caches[layer] = LayerKVCache(
                    batch_size, attn.num_kv_heads, max_seq_len, attn.head_dim, dtype=weight.dtype, device=weight.device
                )
        self._positions = torch.arange(max_seq_len, device=weight.device)
        self.key_ok: Tensor | None = None  # [b, max_seq_len], False at left padding; None: no padding

    @property
    def max_seq_len(self) -> int:
        return self.gen.max_seq_len

    @property
    def batch_size(self) -> int:
        return self.gen.batch_size

    def rows(self, start: int, end: int) -> DecodeCaches:
        """These caches restricted to rows [start, end) (views; the backbone's: `gen.row_caches`)."""
        view = copy.copy(self)
        view.exit_caches = {layer: cache.rows(start, end) for layer, cache in self.exit_caches.items()}
        view.key_ok = None
        return view

    def move_row(self, source: int, target: int, length: int) -> None:
        """Copy row `source`'s first `length` positions over row `target`, in every cache."""
        for cache in [*self.gen.caches, *self.exit_caches.values()]:
            if cache is not None:  # None: a layer another pipeline stage holds
                cache.move_row(source, target, length)

    def set_padding(self, pads: Sequence[int]) -> None:
        if not any(pads):
            self.key_ok = None
            return
        pad = torch.tensor(list(pads), device=self._positions.device)
        self.key_ok = self._positions[None, :] >= pad[:, None]

    def span(self, start: int, length: int) -> Span:
        span = self.gen.span(start, length)
        if self.key_ok is None:
            return span
        end = start + length
        keys = self._positions[:end]
        query = span.input_pos[:, None]
        allowed = (keys <= query) & self.key_ok[:, None, None, :end]  # [b, 1, length, end]
        # A padded query keeps its own key: a row with nothing to attend to would be NaN and
        # poison the deeper layers' values (0 * NaN) even where it is masked out.
        allowed |= keys == query
        return Span(start, length, span.input_pos, allowed)

