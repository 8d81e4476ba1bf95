"""The exit architectures: one `ExitArch` record each, everything the code asks of an arch by name.

Adding an architecture is one `register_exit_arch(ExitArch(...))` here (plus its module class in
`eetune.exits.modules` if it needs a new one) and a test. Every consumer looks the record up:

- `build`: the module, from the backbone (`build_exit`);
- `copies_from`: backbone layers `build` copies (parallel loading reads exactly those);
- `body_params`, `activation_width`: `eetune plan`'s parameter and activation counts;
- `block`: the attribute holding a full transformer block (attention with its own KV cache when
  decoding, tensor-parallel like a backbone block, attention FLOPs in `plan`); None if none;
- `tp_plan`: tensor-parallel styles ("colwise" / "rowwise") of its other linear submodules;
- `draft_layer` / `draft_refusal`: how `export draft` turns it into a decoder's last layers;
- `needs_own_head`: with a shared frozen head it would have nothing to train.

Exits the draft export accepts end in a norm (`norm.scale`), which becomes the draft's final norm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Optional, Protocol

import torch
from torch import nn
from torchtune.modules import TransformerDecoder

from eetune.errors import EetuneError
from eetune.exits.modules import (
    ConfidenceEstimator,
    EarlyExit,
    EmbeddingExit,
    LayerExit,
    MLPExit,
    NormExit,
    build_head,
    clone,
    init_random,
    lm_head_weight,
    reset_norms,
)

if TYPE_CHECKING:
    from eetune.exits.spec import ExitSpec


class ExitShape(Protocol):
    """What the plan's counts read off the model (eetune.parallel.plan.Shape has these)."""

    dim: int
    ffn: int
    kv_dim: int
    layer_params: int  # parameters of one backbone layer


Builder = Callable[["ExitSpec", Optional[nn.Linear], TransformerDecoder], EarlyExit]
# (exit state dict without its confidence estimator, backbone state dict) -> the added decoder
# layer's tensors, names relative to the layer ("attn.q_proj.weight", "mlp.w1.weight", ...).
DraftLayer = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


def _no_sources(spec: ExitSpec, num_layers: int) -> tuple[int, ...]:
    return ()


@dataclass(frozen=True)
class ExitArch:
    name: str
    build: Builder  # (spec, own head or None, backbone) -> the exit, weights copied from the backbone
    body_params: Callable[[ExitShape], int]  # parameters before the head
    activation_width: Callable[[ExitShape, int], float]  # (shape, tp) -> values per token kept for backward
    # 0-based backbone layers `build` copies from (the final norm and LM head are always read).
    copies_from: Callable[[ExitSpec, int], tuple[int, ...]] = _no_sources
    block: Optional[str] = None
    tp_plan: Mapping[str, str] = field(default_factory=dict)
    draft_layer: Optional[DraftLayer] = None  # None: the exit adds no decoder layer
    draft_refusal: Optional[str] = None  # why no decoder can express it; None: exportable
    needs_own_head: bool = False

    @property
    def exportable(self) -> bool:
        return self.draft_refusal is None

    @property
    def draft_extra_layers(self) -> int:
        return int(self.draft_layer is not None)


_ARCHS: dict[str, ExitArch] = {}


def register_exit_arch(arch: ExitArch) -> ExitArch:
    if arch.name in _ARCHS:
        raise ValueError(f"exit arch {arch.name!r} is registered already")
    _ARCHS[arch.name] = arch
    return arch


def unregister_exit_arch(name: str) -> None:
    """Remove ``name`` (tests that register a throwaway arch clean up with this)."""
    del _ARCHS[name]


def exit_arch_names() -> tuple[str, ...]:
    return tuple(_ARCHS)


def get_exit_arch(name: str) -> ExitArch:
    arch = _ARCHS.get(name)
    if arch is None:
        raise EetuneError(f"unknown exit arch '{name}': choose one of {', '.join(_ARCHS)}")
    return arch


def build_exit(spec: ExitSpec, backbone: TransformerDecoder, init_std: float = 0.02) -> EarlyExit:
    """Build one exit from `spec`, copying from the backbone or initialised at random.

    `copy` follows EE-LLM: head <- LM head, norm <- final norm, MLP <- the MLP of the
    exit's own layer, block <- the last backbone layer. The spec is not range-checked here
    (tests place exits after the last layer on purpose); `check_specs` is the user gate.
    """
    if spec.arch not in _ARCHS:
        raise ValueError(f"unknown exit arch {spec.arch!r}")
    head = build_head(backbone) if spec.head == "copy" else None
    module = _ARCHS[spec.arch].build(spec, head, backbone)
    if spec.init == "random":
        init_random(module, init_std)
    elif spec.norm_init == "ones":
        reset_norms(module)
    if spec.confidence != "none":
        weight = lm_head_weight(backbone)
        module.confidence = ConfidenceEstimator(weight.shape[1], spec.confidence).to(weight.dtype)
    module.requires_grad_(True)
    return module


# ---------------------------------------------------------------------------------------------
# the built-in architectures


def own_layer(spec: ExitSpec, num_layers: int) -> int:
    """0-based index of the exit's own backbone layer (clamped: tests place exits past the end)."""
    return min(spec.layer, num_layers) - 1


def silent_attention(backbone: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A layer's attention half that adds exactly zero: zero projections (and biases), unit norm."""
    template = "layers.0."
    out: dict[str, torch.Tensor] = {}
    for key, value in backbone.items():
        if key.startswith(template + "attn."):
            out[key.removeprefix(template)] = torch.zeros_like(value)
        elif key.startswith(template + "sa_norm."):
            out[key.removeprefix(template)] = torch.ones_like(value)
    return out


def _build_mlp(spec: ExitSpec, head: Optional[nn.Linear], backbone: TransformerDecoder) -> EarlyExit:
    source = backbone.layers[own_layer(spec, len(backbone.layers))]
    return MLPExit(spec, head, mlp_norm=clone(source.mlp_norm), mlp=clone(source.mlp), norm=clone(backbone.norm))


def _build_layer(spec: ExitSpec, head: Optional[nn.Linear], backbone: TransformerDecoder) -> EarlyExit:
    return LayerExit(spec, head, block=clone(backbone.layers[-1]), norm=clone(backbone.norm))


def _mlp_draft_layer(exit_state, backbone):
    # One more layer whose attention adds nothing and whose MLP (and its norm) are the exit's.
    return {**silent_attention(backbone), **{k: v for k, v in exit_state.items() if k.startswith(("mlp.", "mlp_norm."))}}


def _layer_draft_layer(exit_state, backbone):
    return {k.removeprefix("block."): v for k, v in exit_state.items() if k.startswith("block.")}


# The head alone, on the raw layer output.
register_exit_arch(ExitArch(
    name="embedding",
    build=lambda spec, head, backbone: EmbeddingExit(spec, head),
    body_params=lambda shape: 0,
    activation_width=lambda shape, tp: shape.dim,
    draft_refusal="head on the raw layer output",
    needs_own_head=True,
))
# The final norm (copied), then the head.
register_exit_arch(ExitArch(
    name="norm",
    build=lambda spec, head, backbone: NormExit(spec, head, norm=clone(backbone.norm)),
    body_params=lambda shape: shape.dim,
    activation_width=lambda shape, tp: 2 * shape.dim,
))
# EE-LLM's `mlp`: a pre-norm gated MLP with a residual (copied from the exit's own layer), then a norm.
register_exit_arch(ExitArch(
    name="mlp",
    build=_build_mlp,
    body_params=lambda shape: 3 * shape.dim * shape.ffn + 2 * shape.dim,
    activation_width=lambda shape, tp: 4 * shape.dim + 4 * shape.ffn / tp,
    copies_from=lambda spec, num_layers: (own_layer(spec, num_layers),),
    tp_plan=MappingProxyType({"mlp.w1": "colwise", "mlp.w3": "colwise", "mlp.w2": "rowwise"}),
    draft_layer=_mlp_draft_layer,
))
# EE-LLM's `layer`: a full transformer block (copied from the last layer), then a norm.
register_exit_arch(ExitArch(
    name="layer",
    build=_build_layer,
    body_params=lambda shape: shape.layer_params + shape.dim,
    activation_width=lambda shape, tp: 6 * shape.dim + (4 * shape.dim + 2 * shape.kv_dim + 4 * shape.ffn) / tp,
    copies_from=lambda spec, num_layers: (num_layers - 1,),
    block="block",
    draft_layer=_layer_draft_layer,
))
