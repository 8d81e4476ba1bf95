"""Experiment tracking: the W&B run that `tune` (its metrics) and `eval` (its report) log to.

Below both train/ and eval/, so neither reaches into the other for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from eetune.config.schema import EetuneConfig
from eetune.errors import EetuneError


def start_wandb(run_dir: Path, cfg: EetuneConfig) -> Any:
    """A W&B run for `cfg.logger` (project, entity, name, mode) writing under `run_dir`.

    Online mode needs a login (WANDB_API_KEY or ~/.netrc): without one this fails at once,
    before anything is logged, rather than prompting.
    """
    import wandb

    mode = cfg.logger.mode or os.environ.get("WANDB_MODE")
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _has_netrc_login()):
        raise EetuneError("logger=wandb online needs a W&B login: run `wandb login`, or set logger.mode=offline")
    return wandb.init(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        name=cfg.logger.name or Path(run_dir).name,
        dir=str(run_dir),
        mode=mode,
        config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
        reinit="finish_previous",
    )


def _has_netrc_login() -> bool:
    return (Path.home() / ".netrc").is_file()
