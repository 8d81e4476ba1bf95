"""What a tune run needs from the frozen backbone, worked out once for tune, the mesh and `plan`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eetune.exits import ExitSpec, read_manifest, specs_from_config


@dataclass(frozen=True)
class RunNeeds:
    specs: list[ExitSpec]  # every exit of the run, in layer order
    needs_final: bool  # whether a loss reads the backbone's final layer (and LM head) output

    @property
    def layers(self) -> list[int]:
        return [spec.layer for spec in self.specs]


def run_specs(cfg: Any) -> list[ExitSpec]:
    """Every exit of the run: from the config, or from the run dir `train.init_from` names."""
    if cfg.train.init_from:
        return sorted((ExitSpec(**spec) for spec in read_manifest(cfg.train.init_from)["exits"]), key=lambda s: s.layer)
    return specs_from_config(cfg.exits)


def run_needs(cfg: Any) -> RunNeeds:
    """The run's exits and whether the final layer is computed: only when a loss needs it
    (distillation, the final layer's argmax as CE target, or a confidence estimator to train)."""
    specs = run_specs(cfg)
    needs_final = (
        cfg.loss.kd_alpha > 0 or cfg.loss.ce_target == "teacher" or any(spec.confidence != "none" for spec in specs)
    )
    return RunNeeds(specs, needs_final)
