"""What every stage does the same way: load the base model from config, record the config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from eetune.models import BaseModel, load_base_model
from eetune.rundir import atomic_write_text

CONFIG_FILE = "config.yaml"


def load_base(model_cfg: Any) -> BaseModel:
    return load_base_model(
        model_cfg.name,
        checkpoint_dir=model_cfg.checkpoint_dir,
        dtype=model_cfg.dtype,
        max_seq_len=model_cfg.max_seq_len,
        device=model_cfg.device,
    )


def base_info(base: BaseModel) -> dict[str, Any]:
    """How a manifest names the base model."""
    return {
        "name": base.name,
        "fingerprint": base.fingerprint,
        "num_layers": base.num_layers,
        "checkpoint_dir": str(base.checkpoint_dir),
    }


def write_config(run_dir: Path, cfg: DictConfig) -> None:
    atomic_write_text(Path(run_dir) / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
