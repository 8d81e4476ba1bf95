"""The base model a config names, with the exits of a run dir on top."""

from __future__ import annotations

from pathlib import Path

from eetune.errors import EetuneError
from eetune.exits.checkpoint import load_exits
from eetune.exits.model import EarlyExitModel
from eetune.models import BaseModel, load_base_model


def load_model(
    run_dir: str | None,
    *,
    name: str,
    checkpoint_dir: str | Path | None = None,
    dtype: str = "float32",
    max_seq_len: int | None = None,
    device: str = "cpu",
) -> tuple[BaseModel, EarlyExitModel]:
    """The base model (`load_base_model`'s arguments, e.g. `**vars(cfg.model)`), with the exits
    of an augment/tune run dir on top (no exits without one)."""
    base = load_base_model(name, checkpoint_dir=checkpoint_dir, dtype=dtype, max_seq_len=max_seq_len, device=device)
    if base.tokenizer is None:
        raise EetuneError(f"{base.checkpoint_dir} has no tokenizer: decoding text needs one (tokenizer.json)")
    model = (
        load_exits(run_dir, base.model, base.fingerprint, base.checkpoint_dir) if run_dir
        else EarlyExitModel(base.model, [])
    )
    return base, model
