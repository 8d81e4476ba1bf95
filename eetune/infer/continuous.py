"""Rows of a continuous batch: sequences that join and leave a running batch at any step.

vLLM's iteration-level scheduling on our position-indexed KV cache. Every row is its own
sequence at its own length: a new row is prefilled alone into a free row of the caches, then
decodes in the same forward as the others, each at its own position (per-row RoPE positions,
per-row cache writes, a per-row attention mask). Rows are kept contiguous: when one leaves,
the last row moves into its place, so a step's forward always covers rows [0, n).

Early exit (`step_exits`): each row leaves at its own exit, and a step goes as deep as its
least confident row needs. As in eetune.infer.early_exit, the deeper layers still owe the KV
entries of the positions that left early: their hidden states wait (`pending`) and join the
next step's forward at their depth, each row at its own positions. Every row of a batch stops
at the same depth each step, so the pending positions are the same number per row; a row
joins only after `flush` has settled them, which keeps it so.

Chunked prefill: a joining row may be prefilled a few tokens at a time between steps (`start`,
`advance`, `join`), so a long prompt does not stall the running rows for its whole prefill. It
is built in row `size` (the first free one) and becomes a row of the batch when it joins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchtune.modules import TransformerDecoder

from eetune.errors import EetuneError
from eetune.exits.archs import get_exit_arch
from eetune.exits.model import EarlyExitModel
from eetune.infer.caches import DecodeCaches
from eetune.infer.early_exit import _Pending
from eetune.infer.generate import layer_forward
from eetune.infer.settings import DecodeSettings

if TYPE_CHECKING:
    from eetune.infer.engine import Engine

# choose(rows [r], logits [r, vocab]) -> the tokens [r] those rows take.
Choose = Callable[[Tensor, Tensor], Tensor]


@dataclass(slots=True)
class _Prefill:
    """The row being prefilled (always row `size`): the tokens it prefills [1, s], how many are done,
    the `layer` exit blocks it fills, and the next-token logits once done (None if deferred)."""

    tokens: Tensor
    fill: tuple[int, ...]
    deferred: bool
    done: int = 0
    logits: Tensor | None = None


class ContinuousBatch:
    """Up to `max_batch_size` sequences decoding together (full model, or early exit with `step_exits`)."""

    def __init__(
        self, model: TransformerDecoder | EarlyExitModel, *, max_batch_size: int, max_seq_len: int | None = None
    ) -> None:
        self.model = model if isinstance(model, EarlyExitModel) else EarlyExitModel(model, [])
        size = self.model.backbone.max_seq_len if max_seq_len is None else max_seq_len
        self.caches = DecodeCaches(self.model, max_batch_size, size)
        self.gen = self.caches.gen
        self.lengths: list[int] = []  # positions fed, per row
        self.pending: list[_Pending] = []  # hidden states [size, n, dim] owed deeper layers, shallowest last
        self.prefilling: _Prefill | None = None  # a row being prefilled, not yet joined

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.gen.batch_size

    @property
    def max_seq_len(self) -> int:
        return self.gen.max_seq_len

    def admit(self, prompt_ids: Sequence[int], fill: Sequence[int] = ()) -> Tensor:
        """Prefill a new row whole (it becomes row `size - 1`), with the `layer` exit blocks in
        `fill`; its next-token logits [vocab], fp32."""
        self.start(prompt_ids, fill)
        self.advance(None)
        return self.join()

    def start(self, prompt_ids: Sequence[int], fill: Sequence[int] = (), *, deferred: bool = False) -> None:
        """Begin prefilling a new row: the whole prompt, or all but its last token (`deferred`:
        early exit decodes that one like any other); `advance` does the work, `join` adds the row."""
        if self.size == self.capacity:
            raise EetuneError(f"the batch is full ({self.capacity} rows)")
        if self.prefilling is not None:
            raise EetuneError("a row is already being prefilled: join it first")
        tokens = self.gen._as_tokens(prompt_ids)
        self.prefilling = _Prefill(tokens[:, :-1] if deferred else tokens, tuple(sorted(fill)), deferred)

    @property
    def prefill_left(self) -> int:
        """Prompt tokens the row being prefilled still needs (0: ready to join)."""
        p = self.prefilling
        return 0 if p is None else p.tokens.shape[1] - p.done

    @torch.inference_mode()
    def advance(self, budget: int | None) -> int:
        """Prefill up to `budget` more tokens (None: all that are left) of the joining row; how many it did."""
        p = self.prefilling
        if p is None:
            raise EetuneError("no row is being prefilled")
        count = self.prefill_left if budget is None else min(budget, self.prefill_left)
        if count > 0:
            h = self._prefill(self.size, p.tokens[:, p.done : p.done + count], p.done, p.fill)
            p.done += count
            if not p.deferred and p.done == p.tokens.shape[1]:
                p.logits = self.gen.final_logits(h[:, -1])[0]
        return count

    def join(self) -> Tensor | None:
        """The prefilled row joins the batch (row `size - 1`); its next-token logits [vocab], or None if deferred."""
        p = self.prefilling
        if p is None or self.prefill_left:
            raise EetuneError("the joining row is not prefilled yet")
        if self.pending:
            raise EetuneError("the batch owes deferred KV entries: flush() before a row joins")
        self.prefilling = None
        self.lengths.append(p.done)
        return p.logits

    def abort_prefill(self) -> None:
        """Drop the row being prefilled (its request went away); what it wrote is simply overwritten later."""
        self.prefilling = None

    @torch.inference_mode()
    def step(self, tokens: Sequence[int]) -> Tensor:
        """Feed every row its next token (one per row, in row order); next-token logits [size, vocab]."""
        n = self._check_step(tokens)
        if self.pending:
            raise EetuneError("the batch owes deferred KV entries: flush() before a full-model step")
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.gen.device)[:, None]
        span = self.gen.row_span(torch.tensor(self.lengths, dtype=torch.long, device=self.gen.device))
        h = self.gen.run_layers(self.gen.embed(ids), 0, self.gen.num_layers, span, self.gen.row_caches(0, n))
        self.lengths = [length + 1 for length in self.lengths]
        return self.gen.final_logits(h[:, -1])

    @torch.inference_mode()
    def step_exits(
        self, engine: Engine, tokens: Sequence[int], stops: Sequence[int], settings: DecodeSettings, choose: Choose
    ) -> tuple[list[int], list[int]]:
        """Feed every row its next token; each leaves at the first of `stops` where `settings`' policy
        is confident, else at the final layer, taking the token `choose` picks from that head's
        logits. Returns (tokens, exit layers), one per row."""
        n = self._check_step(tokens)
        gen, n_layers, device = self.gen, self.gen.num_layers, self.gen.device
        caches, backbone = self.caches.rows(0, n), gen.row_caches(0, n)
        ends = torch.tensor(self.lengths, dtype=torch.long, device=device)  # each row's new position
        next_tokens = torch.zeros(n, dtype=torch.long, device=device)
        exits = torch.full((n,), n_layers, dtype=torch.long, device=device)
        undecided = torch.ones(n, dtype=torch.bool, device=device)
        group, depth = gen.embed(torch.tensor(list(tokens), dtype=torch.long, device=device)[:, None]), 0
        for stop in [*stops, n_layers]:
            span = gen.row_span(ends - group.shape[1] + 1, group.shape[1])
            group = gen.run_layers(group, depth, stop, span, backbone)
            depth = stop
            rows = undecided.nonzero().squeeze(1)
            if stop == n_layers:
                next_tokens[rows] = choose(rows, engine._final_logits(caches, group[rows, -1]))
                self.pending.clear()  # every position now has every layer's KV
                break
            fire, logits = engine._decide(stop, engine._exit_hidden(caches, stop, group, span)[rows], settings)
            if logits is not None:
                fired = rows[fire]
                next_tokens[fired] = choose(fired, logits)
                exits[fired] = stop
                undecided[fired] = False
            if self.pending and self.pending[-1].depth == stop:
                group = torch.cat((self.pending.pop().hidden, group), dim=1)
            if not bool(undecided.any()):
                # Every row stops here; the deeper layers of the whole group are owed to the next forward.
                self.pending.append(_Pending(stop, group))
                break
        self.lengths = [length + 1 for length in self.lengths]
        return next_tokens.tolist(), exits.tolist()

    @torch.inference_mode()
    def flush(self, stops: Sequence[int]) -> None:
        """Settle the owed KV entries: the pending positions go through the deeper layers (and the
        `layer` exit blocks among `stops` they pass), as the next `step_exits` would take them."""
        if not self.pending:
            return
        n, gen = self.size, self.gen
        backbone, exit_caches = gen.row_caches(0, n), self.caches.rows(0, n).exit_caches
        ends = torch.tensor(self.lengths, dtype=torch.long, device=gen.device) - 1  # newest position per row
        entry = self.pending.pop()
        group, depth = entry.hidden, entry.depth
        for stop in [*(layer for layer in stops if layer > depth), gen.num_layers]:
            span = gen.row_span(ends - group.shape[1] + 1, group.shape[1])
            group = gen.run_layers(group, depth, stop, span, backbone)
            depth = stop
            if stop in exit_caches:
                layer_forward(self._exit_block(stop), group, span, exit_caches[stop])
            if self.pending and self.pending[-1].depth == stop:
                group = torch.cat((self.pending.pop().hidden, group), dim=1)

    @torch.inference_mode()
    def retire(self, row: int) -> int | None:
        """Remove `row`; the last row moves into its place. Returns the moved row's old index (None if none moved)."""
        last = self.size - 1
        if not 0 <= row <= last:
            raise EetuneError(f"no row {row} in a batch of {self.size}")
        moved = None
        if row != last:
            self.caches.move_row(last, row, self.lengths[last])
            self.lengths[row] = self.lengths[last]
            for entry in self.pending:
                entry.hidden[row] = entry.hidden[last]
            moved = last
        if self.prefilling is not None:  # it is built in the first free row, which is now `last`
            self.caches.move_row(last + 1, last, self.prefilling.done)
        self.lengths.pop()
        for entry in self.pending:
            entry.hidden = entry.hidden[:last]
        if not self.lengths:
            self.pending.clear()
        return moved

    def _prefill(self, row: int, tokens: Tensor, start: int, fill: Sequence[int]) -> Tensor:
        """Every layer over tokens [1, s] at positions start.., into `row`, plus the `layer` exit blocks in `fill`."""
        gen, span = self.gen, self.gen.span(start, tokens.shape[1])
        caches, exit_caches = gen.row_caches(row, row + 1), self.caches.rows(row, row + 1).exit_caches
        h, depth = gen.embed(tokens), 0
        for layer in sorted(fill):
            h = gen.run_layers(h, depth, layer, span, caches)
            depth = layer
            layer_forward(self._exit_block(layer), h, span, exit_caches[layer])
        return gen.run_layers(h, depth, gen.num_layers, span, caches)

    def _exit_block(self, layer: int) -> torch.nn.Module:
        """The transformer block of a `layer` exit (the one kind of exit with a KV cache)."""
        exit_module = self.model.exit(layer)
        return exit_module.get_submodule(get_exit_arch(exit_module.spec.arch).block)

    def _check_step(self, tokens: Sequence[int]) -> int:
        n = self.size
        if len(tokens) != n or n == 0:
            raise EetuneError(f"step needs one token per row: got {len(tokens)} for {n} rows")
        if any(length >= self.max_seq_len for length in self.lengths):
            raise EetuneError(f"a row has filled all {self.max_seq_len} positions of the KV cache")
        return n
