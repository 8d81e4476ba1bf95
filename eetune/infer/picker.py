"""One request's token choice (`Picker`): logit bias, penalties, greedy or sampling, logprobs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from eetune.infer.sampling import SamplingParams, TokenLogprob, adjust, bias_vector, make_rng, sample, token_logprobs
from eetune.infer.settings import DecodeSettings


class Picker:
    """One request's token choice, row by row: sampling params, RNG, logit bias, the tokens each
    row generated so far (for penalties) and the log-probabilities of the chosen tokens.

    `choose` picks for some rows and stages their logprobs; `record` makes a row's pick part
    of its history. The early-exit confidence decision never sees these adjustments.
    """

    def __init__(
        self,
        s: DecodeSettings,
        params: SamplingParams,
        rows: int,
        vocab: int,
        device: torch.device,
        on_logprob: Callable[[TokenLogprob], None] | None = None,
    ) -> None:
        self.params = params
        self.on_logprob = on_logprob  # told of each recorded entry (batch 1 streaming)
        self.rng = None if params.greedy else make_rng(s.seed, device)
        self.bias = bias_vector(params, vocab, device)
        self.counts = torch.zeros(rows, vocab, device=device) if params.penalised else None
        self.top = s.logprobs
        self.logprobs: list[list[TokenLogprob]] | None = None if s.logprobs is None else [[] for _ in range(rows)]
        self._staged: dict[int, TokenLogprob] = {}

    def adjust(self, logits: Tensor, counts: Tensor | None, ids: Tensor | None = None) -> Tensor:
        """Bias and penalties on logits [n, vocab] (or over the token ids `ids` only) given counts [n, vocab]."""
        bias = self.bias
        if ids is not None:
            bias = None if bias is None else bias[ids]
            counts = None if counts is None else counts[:, ids]
        return adjust(logits, self.params, bias, counts)

    def choose(self, logits: Tensor, rows: Tensor) -> Tensor:
        """Tokens [len(rows)] for rows `rows` from their logits [len(rows), vocab]."""
        logits = self.adjust(logits, None if self.counts is None else self.counts[rows])
        tokens = sample(logits, self.params, self.rng)
        if self.top is not None:
            for row, entry in zip(rows.tolist(), token_logprobs(logits, tokens, self.top)):
                self._staged[row] = entry
        return tokens

    def record(self, row: int, token: int, logprob: TokenLogprob | None = None) -> TokenLogprob | None:
        """Token `token` is row `row`'s next; returns its logprob entry (the staged one unless given)."""
        if self.counts is not None:
            self.counts[row, token] += 1
        if self.logprobs is None:
            return None
        entry = logprob if logprob is not None else self._staged.pop(row)
        self.logprobs[row].append(entry)
        if self.on_logprob is not None:
            self.on_logprob(entry)
        return entry

    def history(self, row: int, drafts: Tensor) -> Tensor | None:
        """Counts [k + 1, vocab] at the positions of drafts [k] and the one after: position j
        has also generated drafts[:j]. None without penalties."""
        if self.counts is None:
            return None
        k, vocab = drafts.shape[0], self.counts.shape[1]
        seen = torch.zeros(k + 1, vocab, device=self.counts.device)
        if k:
            seen[1:] = torch.nn.functional.one_hot(drafts, vocab).float().cumsum(0)
        return self.counts[row] + seen

