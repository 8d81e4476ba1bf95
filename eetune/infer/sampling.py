"""Turning next-token logits into token ids: greedy, temperature, top-k, top-p.

`probabilities` is kept separate from `sample` because speculative decoding's rejection
sampling needs the same processed distribution for draft and target, not just a token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from eetune.errors import EetuneError


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick the next token. temperature 0 means greedy (top_k/top_p are then unused)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise EetuneError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}"
            )
        if self.top_k is not None and self.top_k < 1:
            raise EetuneError(f"top_k must be >= 1 or unset, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise EetuneError(f"top_p must be in (0, 1] or unset, got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_rng(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A private generator so sampling neither reads nor disturbs torch's global RNG."""
    rng = torch.Generator(device=device)
    if seed is None:
        rng.seed()
    else:
        rng.manual_seed(seed)
    return rng


def probabilities(logits: Tensor, params: SamplingParams) -> Tensor:
    """Distribution after temperature, top-k and top-p: [..., vocab] float logits -> probs.

    Greedy params give a one-hot distribution on the argmax.
    """
    logits = logits.float()
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if params.top_k is not None and params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token once the mass strictly before it already reaches top_p; the most
        # likely token always survives.
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits.softmax(-1)


def sample(logits: Tensor, params: SamplingParams, rng: torch.Generator | None = None) -> Tensor:
    """Pick one token per row: [b, vocab] logits -> [b] int64 token ids."""
    if params.greedy:
        return logits.argmax(-1)
    probs = probabilities(logits, params)
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1)
