"""A tune run's exits: which (from `exits` or `train.init_from`), what they need from the frozen
backbone (worked out once, for tune, the mesh and `plan`), and building them on a base model."""

from __future__ import annotations

from dataclasses import dataclass

from eetune.config.schema import EetuneConfig
from eetune.exits import EarlyExitModel, ExitSpec, check_specs, exit_specs, load_exits, read_manifest
from eetune.models import BaseModel


@dataclass(frozen=True)
class RunNeeds:
    specs: list[ExitSpec]  # every exit of the run, in layer order
    needs_final: bool  # whether a loss reads the backbone's final layer (and LM head) output

    @property
    def layers(self) -> list[int]:
        return [spec.layer for spec in self.specs]


def run_specs(cfg: EetuneConfig) -> list[ExitSpec]:
    """Every exit of the run: from the config, or from the run dir `train.init_from` names."""
    if cfg.train.init_from:
        return sorted((ExitSpec(**spec) for spec in read_manifest(cfg.train.init_from)["exits"]), key=lambda s: s.layer)
    e = cfg.exits
    return exit_specs(e.layers, arch=e.arch, init=e.init, head=e.head, confidence=e.confidence, norm_init=e.norm_init)


def run_needs(cfg: EetuneConfig) -> RunNeeds:
    """The run's exits and whether the final layer is computed: only when a loss needs it
    (distillation, the final layer's argmax as CE target, or a confidence estimator to train)."""
    specs = run_specs(cfg)
    needs_final = (
        cfg.loss.kd_alpha > 0 or cfg.loss.ce_target == "teacher" or any(spec.confidence != "none" for spec in specs)
    )
    return RunNeeds(specs, needs_final)


def build_model(cfg: EetuneConfig, base: BaseModel) -> EarlyExitModel:
    """The run's exits on `base`: fresh from `exits`, or the tuned ones `train.init_from` names."""
    if cfg.train.init_from:
        model = load_exits(cfg.train.init_from, base.model, base.fingerprint, base.checkpoint_dir)
    else:
        specs = run_specs(cfg)  # from `exits`: train.init_from is unset here
        check_specs(specs, base.num_layers)
        model = EarlyExitModel(base.model, specs, init_std=cfg.exits.init_std)
    # fp32 master weights for the optimizer; bf16 compute comes from autocast.
    model.exits.float()
    return model
