"""The acceptance step of speculative decoding (Leviathan et al. 2023, Chen et al. 2023).

Given k drafted tokens, the draft distributions they were sampled from and the target
(full-model) distributions at the same k + 1 positions, emit the longest accepted prefix
plus one token from the target side. The emitted sequence is distributed exactly as if
every token had been sampled from the target model; with one-hot (greedy) distributions it
reduces to "accept while the draft equals the target's argmax, then the target's argmax".
"""

from __future__ import annotations

import torch
from torch import Tensor


def accept_greedy(draft: Tensor, target_logits: Tensor) -> tuple[int, int]:
    """draft [k] token ids, target_logits [k + 1, vocab] -> (accepted count, next token)."""
    target = target_logits.argmax(-1)
    agree = (draft == target[: draft.shape[0]]).long()
    # cumprod turns the first disagreement and everything after it into zeros.
    accepted = int(agree.cumprod(0).sum()) if draft.numel() else 0
    return accepted, int(target[accepted])


def accept_sampled(
    draft: Tensor,
    draft_probs: Tensor,
    target_probs: Tensor,
    rng: torch.Generator | None,
) -> tuple[int, int]:
    """Speculative rejection sampling.

    draft [k] ids sampled from draft_probs [k, vocab]; target_probs [k + 1, vocab].
    Token i is kept with probability min(1, p_i(d_i) / q_i(d_i)); the first rejected one is
    replaced by a sample of normalise(max(p_i - q_i, 0)); if all k are kept, one more token
    is sampled from p_k. Returns (accepted count, the token emitted after them).
    """
    k = draft.shape[0]
    if k:
        # One uniform per draft, drawn up front so the RNG stream does not depend on where
        # the first rejection falls (reproducible for a given seed either way).
        u = torch.rand(k, generator=rng, device=draft.device)
        rows = torch.arange(k, device=draft.device)
        p = target_probs[rows, draft]
        q = draft_probs[rows, draft]
        rejected = (u * q >= p).nonzero()  # u >= p / q without dividing by q
        if rejected.numel():
            i = int(rejected[0, 0])
            residual = (target_probs[i] - draft_probs[i]).clamp_min(0.0)
            mass = residual.sum()
            # p == q up to rounding leaves no residual mass; then p itself is the right law.
            dist = residual / mass if mass > 0 else target_probs[i]
            return i, int(torch.multinomial(dist, 1, generator=rng))
    return k, int(torch.multinomial(target_probs[k], 1, generator=rng))
