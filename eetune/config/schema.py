"""The typed config schema: one dataclass per section, registered in Hydra's ConfigStore.

Recipes (`recipes/*.yaml`) and groups (`configs/<group>/*.yaml`) are merged onto these
dataclasses, so an unknown key or a wrongly typed value fails at composition time.
Allowed values of string fields are listed in `CHOICES`; each section's `validate()` checks
them and every other value rule a type cannot express, with one-line `EetuneError` messages.
`compose_config` returns an `EetuneConfig` instance and calls `EetuneConfig.validate()`.

The sections live in `eetune.config.sections` (by concern) and the shared checks in
`eetune.config.checks`; this module assembles them and re-exports every one, so
`from eetune.config.schema import ServeConfig` and the like keep working.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from eetune.config.checks import CHOICES, check_choices, check_positive
from eetune.config.sections.data import DataConfig, DataSourceConfig, DistillConfig
from eetune.config.sections.decoding import ExitPolicyConfig, GenerateConfig, ServeConfig
from eetune.config.sections.evaluation import EvalConfig, EvalTaskConfig
from eetune.config.sections.export import ExportConfig
from eetune.config.sections.model import ExitsConfig, ModelConfig
from eetune.config.sections.parallel import ParallelConfig, PlanConfig
from eetune.config.sections.training import LoggerConfig, LossConfig, OptimConfig, TrainConfig
from eetune.errors import EetuneError
from eetune.rundir import BUILTIN_PREFIX

__all__ = [
    "CHOICES", "SCHEMA_NAME", "DataConfig", "DataSourceConfig", "DistillConfig", "EetuneConfig", "EvalConfig",
    "EvalTaskConfig", "ExitPolicyConfig", "ExitsConfig", "ExportConfig", "GenerateConfig", "LoggerConfig",
    "LossConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "PlanConfig", "ServeConfig", "TrainConfig",
    "check_choices", "check_positive", "register_schema", "to_container", "to_typed", "to_yaml",
]


@dataclass
class EetuneConfig:
    """Everything a stage reads. The CLI sets `stage`; recipes set the rest."""

    stage: str = "augment"
    # Where the stage writes its results; created fresh, never overwritten.
    run_dir: str = "runs/${stage}-${now:%Y%m%d-%H%M%S}"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    exits: ExitsConfig = field(default_factory=ExitsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    # Continue an interrupted `tune` in the same run_dir, or extend a finished one with a larger
    # train.steps (a finished run resumed without one changes nothing). Its config must match but
    # for train.steps, flat_patience, eval_every, log_every, checkpoint_every and the logger.
    # `data distill`: continue the corpus in distill.out (only distill.max_tokens may change).
    resume: bool = False

    def validate(self) -> None:
        """Every section's value checks the schema's types cannot express, made at composition.
        A stage checks the sections only it reads with their `validate_run()` before it starts."""
        if self.stage in ("augment", "tune") and str(self.run_dir).startswith(BUILTIN_PREFIX):
            raise EetuneError(f"run_dir={self.run_dir} names shipped exits, which are read-only: "
                              f"write the {self.stage} run elsewhere (train.init_from={self.run_dir} tunes from them)")
        self.model.validate()
        self.exits.validate()
        self.generate.validate()
        self.serve.validate()
        self.data.validate(self.stage)
        self.optim.validate()
        self.loss.validate()
        self.train.validate()
        self.logger.validate()
        self.distill.validate()
        self.eval.validate()
        self.export.validate()
        self.parallel.validate()
        self.plan.validate()

    def validate_tune(self) -> None:
        """`tune`'s checks before anything is written."""
        self.loss.validate_run()
        self.train.validate_run()
        self.optim.validate_run()
        self.data.validate_run()


def to_typed(node: Any) -> EetuneConfig:
    """An `EetuneConfig` from a config tree (a DictConfig, a dict, or a YAML file loaded with
    OmegaConf.load): merged onto the schema, so keys it lacks take their defaults."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EetuneConfig), node))


def to_yaml(cfg: Any) -> str:
    """The YAML a run dir's config.yaml and `--print-config` hold."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


def to_container(cfg: Any) -> dict[str, Any]:
    """Plain nested dicts and lists (a dataclass instance or a DictConfig)."""
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


SCHEMA_NAME = "eetune_schema"


def register_schema() -> None:
    """Store the schema so recipes can list it first in their defaults."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=EetuneConfig)
