"""What an exit is: where it sits, its architecture, how it is initialised, which head it uses."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

from eetune.errors import EetuneError
from eetune.exits.archs import exit_arch_names, get_exit_arch

# The registered exit architectures (eetune.exits.archs) at import: what the config schema offers.
ARCHS = exit_arch_names()
INITS = ("random", "copy")
HEADS = ("shared", "copy")
CONFIDENCES = ("none", "linear", "mlp")
NORM_INITS = ("copy", "ones")
# early_exit threshold when none is given and the run dir has no calibration.
DEFAULT_THRESHOLD = 0.8


@dataclass(frozen=True)
class ExitSpec:
    """An exit reading the output of backbone layer `layer` (1-based)."""

    layer: int
    arch: str = "mlp"
    init: str = "copy"
    head: str = "shared"
    # Learned confidence estimator on the exit's hidden state (CALM's "meta" classifier).
    confidence: str = "none"
    # With init=copy: `copy` also copies the norms (final norm, the layer's MLP norm); `ones`
    # starts them at identity, since the final norm's scales suit final-layer states only.
    norm_init: str = "copy"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def exit_specs(
    layers: Iterable[int],
    *,
    arch: str = "mlp",
    init: str = "copy",
    head: str = "shared",
    confidence: str = "none",
    norm_init: str = "copy",
) -> list[ExitSpec]:
    """One spec per layer in `layers` (an `exits:` section's), sharing the rest; sorted by depth."""
    return sorted(
        (ExitSpec(int(layer), arch, init, head, confidence, norm_init) for layer in layers),
        key=lambda spec: spec.layer,
    )


def check_specs(specs: Iterable[ExitSpec], num_layers: int) -> None:
    """User-facing rules: exits sit strictly inside the backbone, one per layer, known kinds."""
    specs = list(specs)
    if not specs:
        raise EetuneError("no exits given: set exits.layers, e.g. exits.layers=[8,16,24]")
    seen: set[int] = set()
    for spec in specs:
        if not 1 <= spec.layer <= num_layers - 1:
            raise EetuneError(
                f"exit at layer {spec.layer} does not fit a {num_layers}-layer model: "
                f"exit layers must be in 1..{num_layers - 1}"
            )
        if spec.layer in seen:
            raise EetuneError(f"two exits at layer {spec.layer}: each layer holds at most one exit")
        seen.add(spec.layer)
        arch = get_exit_arch(spec.arch)  # raises for an unknown arch, naming the registered ones
        if spec.init not in INITS:
            raise EetuneError(f"unknown exit init '{spec.init}': choose one of {', '.join(INITS)}")
        if spec.head not in HEADS:
            raise EetuneError(f"unknown exit head '{spec.head}': choose one of {', '.join(HEADS)}")
        if spec.norm_init not in NORM_INITS:
            raise EetuneError(f"unknown exit norm_init '{spec.norm_init}': choose one of {', '.join(NORM_INITS)}")
        if spec.confidence not in CONFIDENCES:
            raise EetuneError(
                f"unknown exit confidence '{spec.confidence}': choose one of {', '.join(CONFIDENCES)}"
            )
        if arch.needs_own_head and spec.head == "shared":
            raise EetuneError(
                f"an '{spec.arch}' exit with a shared frozen head has nothing to train: use exits.head=copy"
            )
