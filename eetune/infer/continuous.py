"""Rows of a continuous batch: sequences that join and leave a running batch at any step.

vLLM's iteration-level scheduling on our position-indexed KV cache. Every row is its own
sequence at its own length: a new row is prefilled alone into a free row of the caches, then
decodes in the same forward as the others, each at its own position (per-row RoPE positions,
per-row cache writes, a per-row attention mask). Rows are kept contiguous: when one leaves,
the last row moves into its place, so a step's forward always covers rows [0, n).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchtune.modules import TransformerDecoder

from eetune.errors import EetuneError
from eetune.infer.generate import Generator


class ContinuousBatch:
    """Up to `max_batch_size` sequences decoding together with the full model."""

    def __init__(self, model: TransformerDecoder, *, max_batch_size: int, max_seq_len: int | None = None) -> None:
        self.gen = Generator(model, max_seq_len=max_seq_len, batch_size=max_batch_size)
        self.lengths: list[int] = []  # positions filled, per row

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.gen.batch_size

    @property
    def max_seq_len(self) -> int:
        return self.gen.max_seq_len

    @torch.inference_mode()
    def admit(self, prompt_ids: Sequence[int]) -> Tensor:
        """Prefill a new row (it becomes row `size - 1`); its next-token logits [vocab], fp32."""
        row = self.size
        if row == self.capacity:
            raise EetuneError(f"the batch is full ({self.capacity} rows)")
        tokens = self.gen._as_tokens(prompt_ids)
        length = tokens.shape[1]
        span = self.gen.span(0, length)
        h = self.gen.run_layers(self.gen.embed(tokens), 0, self.gen.num_layers, span, self.gen.row_caches(row, row + 1))
        self.lengths.append(length)
        return self.gen.final_logits(h[:, -1])[0]

    @torch.inference_mode()
    def step(self, tokens: Sequence[int]) -> Tensor:
        """Feed every row its next token (one per row, in row order); next-token logits [size, vocab]."""
        n = self.size
        if len(tokens) != n or n == 0:
            raise EetuneError(f"step needs one token per row: got {len(tokens)} for {n} rows")
        if any(length >= self.max_seq_len for length in self.lengths):
            raise EetuneError(f"a row has filled all {self.max_seq_len} positions of the KV cache")
        device = self.gen.device
        positions = torch.tensor(self.lengths, dtype=torch.long, device=device)
        ids = torch.tensor(list(tokens), dtype=torch.long, device=device)[:, None]
        span = self.gen.row_span(positions)
        h = self.gen.run_layers(self.gen.embed(ids), 0, self.gen.num_layers, span, self.gen.row_caches(0, n))
        self.lengths = [length + 1 for length in self.lengths]
        return self.gen.final_logits(h[:, -1])

    def retire(self, row: int) -> int | None:
        """Remove `row`; the last row moves into its place. Returns the moved row's old index (None if none moved)."""
        last = self.size - 1
        if not 0 <= row <= last:
            raise EetuneError(f"no row {row} in a batch of {self.size}")
        moved = None
        if row != last:
            for cache in self.gen.caches:
                cache.move_row(last, row, self.lengths[last])
            self.lengths[row] = self.lengths[last]
            moved = last
        self.lengths.pop()
        return moved
