"""The base model a config names, with the exits of a run dir on top."""

from __future__ import annotations

from typing import Any

from eetune.errors import EetuneError
from eetune.exits.checkpoint import load_exits
from eetune.exits.model import EarlyExitModel
from eetune.models import BaseModel, load_base


def load_model(model_cfg: Any, run_dir: str | None) -> tuple[BaseModel, EarlyExitModel]:
    """The base model, with the exits of an augment/tune run dir on top (no exits without one)."""
    base = load_base(model_cfg)
    if base.tokenizer is None:
        raise EetuneError(f"{base.checkpoint_dir} has no tokenizer: decoding text needs one (tokenizer.json)")
    model = (
        load_exits(run_dir, base.model, base.fingerprint, base.checkpoint_dir) if run_dir
        else EarlyExitModel(base.model, [])
    )
    return base, model
