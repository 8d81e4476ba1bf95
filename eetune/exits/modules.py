"""Exit modules: what sits between a backbone layer's output and a vocabulary head.

Which module each exit arch builds, and from which backbone weights, is `eetune.exits.archs`.

Each exit maps the hidden state after layer L to a normalised hidden state ready for a
head. The head is either the frozen LM head (`shared`, not owned by the exit, so not in
its state dict) or the exit's own `nn.Linear` (`copy`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn
from torchtune.modules import RMSNorm, TiedLinear, TransformerDecoder

if TYPE_CHECKING:
    from eetune.exits.spec import ExitSpec


class ConfidenceEstimator(nn.Module):
    """Predicts, from an exit's normalised hidden state, whether the exit's top-1 token
    equals the final layer's (a logit). Costs a few thousand FLOPs instead of a
    vocabulary head, so inference can decide to exit before paying for the head."""

    def __init__(self, dim: int, kind: str, hidden: int = 64) -> None:
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(dim, 1)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        else:
            raise ValueError(f"unknown confidence estimator {kind!r}")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden).squeeze(-1)


class EarlyExit(nn.Module):
    """Base: `forward(h) -> normalised hidden`; `head` is the exit's own head or None;
    `confidence` an optional learned estimator of agreement with the final layer."""

    def __init__(self, spec: ExitSpec, head: Optional[nn.Linear]) -> None:
        super().__init__()
        self.spec = spec
        self.head = head
        self.confidence: Optional[ConfidenceEstimator] = None

    def forward(
        self, h: torch.Tensor, *, mask: Optional[torch.Tensor] = None, input_pos: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        raise NotImplementedError


class EmbeddingExit(EarlyExit):
    """Head only, on the raw layer output."""

    def forward(self, h, *, mask=None, input_pos=None):
        return h


class NormExit(EarlyExit):
    def __init__(self, spec: ExitSpec, head: Optional[nn.Linear], norm: nn.Module) -> None:
        super().__init__(spec, head)
        self.norm = norm

    def forward(self, h, *, mask=None, input_pos=None):
        return self.norm(h)


class MLPExit(EarlyExit):
    """A pre-norm gated MLP block with a residual, then the output norm (EE-LLM's `mlp`)."""

    def __init__(
        self, spec: ExitSpec, head: Optional[nn.Linear], mlp_norm: nn.Module, mlp: nn.Module, norm: nn.Module
    ) -> None:
        super().__init__(spec, head)
        self.mlp_norm = mlp_norm
        self.mlp = mlp
        self.norm = norm

    def forward(self, h, *, mask=None, input_pos=None):
        return self.norm(h + self.mlp(self.mlp_norm(h)))


class LayerExit(EarlyExit):
    """A full transformer block (attention + MLP), then the output norm (EE-LLM's `layer`)."""

    def __init__(self, spec: ExitSpec, head: Optional[nn.Linear], block: nn.Module, norm: nn.Module) -> None:
        super().__init__(spec, head)
        self.block = block
        self.norm = norm

    def forward(self, h, *, mask=None, input_pos=None):
        return self.norm(self.block(h, mask=mask, input_pos=input_pos))


def lm_head_weight(backbone: TransformerDecoder) -> torch.Tensor:
    """The LM head's weight, [vocab, dim], whether the head is tied to the embeddings or not."""
    output = backbone.output
    if isinstance(output, TiedLinear):
        return output.tied_module.weight
    return output.weight


def head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`hidden @ weight.T` over the whole vocabulary. A head split by vocabulary over tensor-parallel
    ranks (eetune.parallel.inference_tp) carries a `vocab_split` that gathers every rank's slice."""
    logits = nn.functional.linear(hidden, weight)
    split = getattr(weight, "vocab_split", None)
    return logits if split is None else split.gather(logits)


def head_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The rows of head `weight` for token `ids` (whole rows, even from a head split by vocabulary)."""
    split = getattr(weight, "vocab_split", None)
    return weight[ids] if split is None else split.rows(weight, ids)


def build_head(backbone: TransformerDecoder) -> nn.Linear:
    """An own head: a copy of the LM head."""
    weight = lm_head_weight(backbone)
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head


def clone(module: nn.Module) -> nn.Module:
    """A deep copy; a copied attention block must not share KV-cache state with the backbone."""
    copied = copy.deepcopy(module)
    for sub in copied.modules():
        if hasattr(sub, "kv_cache"):
            sub.kv_cache = None
            sub.cache_enabled = False
    return copied


@torch.no_grad()
def init_random(module: nn.Module, std: float) -> None:
    """Normal(0, std) for every linear weight, zero biases, norms back to identity."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
    reset_norms(module)


@torch.no_grad()
def reset_norms(module: nn.Module) -> None:
    for sub in module.modules():
        if isinstance(sub, RMSNorm):
            nn.init.ones_(sub.scale)
        elif isinstance(sub, nn.LayerNorm):
            sub.reset_parameters()
