"""Turning next-token logits into token ids: logit bias and penalties, greedy, temperature, top-k, top-p.

The pipeline, in order: `adjust` (logit_bias, then presence/frequency penalties over the
tokens generated so far) -> temperature -> top-k -> top-p -> draw. Greedy takes the argmax of
the adjusted logits. `probabilities` is kept separate from `sample` because speculative
decoding's rejection sampling needs the same processed distribution for draft and target,
not just a token. `token_logprobs` reports the adjusted distribution, before temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from eetune.errors import EetuneError

# What torch.Generator.manual_seed takes: negative seeds are mapped onto the unsigned range.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick the next token. temperature 0 means greedy (top_k/top_p are then unused).

    presence_penalty / frequency_penalty subtract penalty (x 1 / x count) from the logit of
    every token already generated (the prompt does not count); logit_bias adds its value to
    its token's logit. Both apply before temperature, greedy included.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = field(default=())

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise EetuneError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}"
            )
        if self.top_k is not None and self.top_k < 1:
            raise EetuneError(f"top_k must be >= 1 or unset, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise EetuneError(f"top_p must be in (0, 1] or unset, got {self.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise EetuneError(f"{name} must be a finite number, got {getattr(self, name)}")
        if any(not math.isfinite(bias) for _, bias in self.logit_bias):
            raise EetuneError("logit_bias values must be finite numbers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        """Whether the logits depend on the tokens generated so far."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def make_rng(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A private generator so sampling neither reads nor disturbs torch's global RNG."""
    rng = torch.Generator(device=device)
    if seed is None:
        rng.seed()
    elif not SEED_MIN <= seed <= SEED_MAX:
        raise EetuneError(f"seed must be in [-2**63, 2**64 - 1], got {seed}")
    else:
        rng.manual_seed(seed)
    return rng


def bias_vector(params: SamplingParams, vocab: int, device: torch.device | str = "cpu") -> Tensor | None:
    """logit_bias as a dense [vocab] float tensor, or None when there is none."""
    if not params.logit_bias:
        return None
    ids = [token for token, _ in params.logit_bias]
    if min(ids) < 0 or max(ids) >= vocab:
        raise EetuneError(f"logit_bias token ids must be in [0, {vocab}), the model's vocabulary")
    bias = torch.zeros(vocab, device=device)
    bias[torch.tensor(ids, device=device)] = torch.tensor([b for _, b in params.logit_bias], device=device)
    return bias


def adjust(logits: Tensor, params: SamplingParams, bias: Tensor | None, counts: Tensor | None) -> Tensor:
    """Logits [r, vocab] with logit_bias ([vocab]) and penalties from counts ([r, vocab]) applied, float32.

    counts[i, t]: how often token t was generated before row i's position.
    """
    logits = logits.float()
    if bias is not None:
        logits = logits + bias
    if counts is not None and params.penalised:
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    return logits


def _tempered(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature, safe for any temperature > 0.

    Shifting by the row max first keeps the top logit at exactly 0, so a temperature so small
    that the division underflows or overflows (1e-45) still leaves a finite maximum (that is,
    sampling turns greedy) instead of 0/0 or inf - inf in the softmax.
    """
    shifted = logits - logits.amax(-1, keepdim=True)
    return torch.where(shifted == 0, 0.0, shifted / temperature)


def probabilities(logits: Tensor, params: SamplingParams) -> Tensor:
    """Distribution after temperature, top-k and top-p: [..., vocab] float logits -> probs.

    Greedy params give a one-hot distribution on the argmax. Logit bias and penalties are
    `adjust`'s business: pass adjusted logits.
    """
    logits = logits.float()
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = _tempered(logits, params.temperature)
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
    if params.top_p is not None and params.top_p < 1.0:
        picked = _sample_nucleus(logits, params, rng)
        if picked is not None:
            return picked
    probs = probabilities(logits, params)
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1)


# How many of the most likely tokens top-p sampling looks among before sorting the whole vocabulary,
# and the smaller first look that usually holds the nucleus already (at temperature 0.7 on
# SmolLM2, the top 64 nearly always reach top-p 0.95).
NUCLEUS_CANDIDATES = 1024
NUCLEUS_FIRST_LOOK = 64


def _sample_nucleus(logits: Tensor, params: SamplingParams, rng: torch.Generator | None) -> Tensor | None:
    """Top-p sampling among the most likely candidates: the law of `probabilities`, without
    sorting and drawing over the whole vocabulary (at batch 64 on SmolLM2's 49k tokens those
    cost a fifth of a decode step). None when some row's nucleus reaches past the candidates.

    The first look takes the top NUCLEUS_FIRST_LOOK; only when some row's nucleus reaches past
    them does it take all NUCLEUS_CANDIDATES. Either way the draw is over NUCLEUS_CANDIDATES
    entries (the tokens past the nucleus at probability 0), so the RNG is used alike and a seed
    picks the same token as with the wide look alone.
    """
    logits = _tempered(logits.float(), params.temperature)
    vocab = logits.shape[-1]
    k = min(NUCLEUS_CANDIDATES, vocab, params.top_k or vocab)
    top_k_first = params.top_k is not None and params.top_k <= k
    # Top-k first: its softmax needs all k candidates, so there is no smaller first look.
    looks = (k,) if top_k_first else dict.fromkeys((min(NUCLEUS_FIRST_LOOK, k), k))
    log_total = None if top_k_first else logits.logsumexp(-1, keepdim=True)  # once for both looks
    for look in looks:
        top, ids = logits.topk(look, dim=-1)  # sorted, most likely first
        if top_k_first:
            probs = top.softmax(-1)  # top-k first, then top-p within it, as `probabilities` does
        else:
            probs = (top - log_total).exp()
        cumulative = probs.cumsum(-1)
        if bool((cumulative[..., -1] >= params.top_p).all()):
            break
    else:
        return None  # a non-candidate would still be kept: take the exact path
    kept = probs.masked_fill(cumulative - probs >= params.top_p, 0.0)
    if look < k:
        kept = torch.nn.functional.pad(kept, (0, k - look))
    return ids.gather(-1, torch.multinomial(kept, 1, generator=rng).clamp_max(look - 1)).squeeze(-1)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability and the `top` most likely tokens' (id, logprob), best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprobs(logits: Tensor, tokens: Tensor, top: int) -> list[TokenLogprob]:
    """Log-probabilities of tokens [r] under adjusted logits [r, vocab] (no temperature), with the top `top`."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None].long())[:, 0].tolist()
    if top > 0:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprob(t, lp, tp) for t, lp, tp in zip(tokens.tolist(), chosen, tops)]
