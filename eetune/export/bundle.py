"""`eetune export hf`: the base checkpoint plus all of a run's exits as one Hugging Face dir.

The base model's files are copied byte for byte, so the dir is still the same checkpoint to
transformers (which ignores what it does not know); config.json gains the run's manifest
under ``EXPORT_CONFIG_KEY`` and ``exits.safetensors`` holds the exit tensors under the
``exits.`` prefix (the names they have inside an EarlyExitModel). eetune reads the dir back as
a base model (``model.checkpoint_dir=DIR``) and as a run dir (``generate.run_dir=DIR``), or
both at once with ``load_exported``.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from eetune.errors import EetuneError
from eetune.exits import EXITS_FILE, EarlyExitModel, load_exits, read_manifest
from eetune.exits.checkpoint import EXPORT_CONFIG_KEY
from eetune.models import BaseModel, load_base_model
from eetune.models import hf_config as hfc
from eetune.models.checkpoint import publish_dir, staging_dir
from eetune.models.gguf_import import IMPORT_MARKER

TENSOR_PREFIX = "exits."
# Files of the base dir that describe it rather than belong to it.
_NOT_COPIED = {hfc.CONFIG_FILE, IMPORT_MARKER, EXITS_FILE}


def export_bundle(run_dir: Path, checkpoint_dir: Path, manifest: dict[str, Any], out_dir: Path) -> Path:
    """Copy the base checkpoint dir to ``out_dir`` with the run's exits added (atomically). The files
    are copied, never loaded: check the base's fingerprint first (the stage streams it)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise EetuneError(f"{out_dir} already exists; delete it or choose another out=...")
    source = Path(checkpoint_dir)
    config = hfc.read_hf_config(source)
    prefix = manifest.get("tensor_prefix", "")  # set when the source is itself an exported dir
    tensors = {k.removeprefix(prefix): v for k, v in load_file(str(Path(run_dir) / EXITS_FILE)).items()}
    embedded = {
        **manifest,
        # The base weights now sit beside the exits: the dir is its own checkpoint dir.
        "base_model": {**manifest["base_model"], "checkpoint_dir": "."},
        "tensor_prefix": TENSOR_PREFIX,
        "exported": {
            "from_run_dir": str(run_dir),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        },
    }
    staged = staging_dir(out_dir)
    try:
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name not in _NOT_COPIED:
                shutil.copyfile(path, staged / path.name)
        save_file(
            {TENSOR_PREFIX + name: tensor.contiguous() for name, tensor in tensors.items()},
            str(staged / EXITS_FILE),
            metadata={"format": manifest["format"], "base_fingerprint": manifest["base_model"]["fingerprint"]},
        )
        config[EXPORT_CONFIG_KEY] = embedded
        (staged / hfc.CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        publish_dir(staged, out_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return out_dir


def load_exported(
    export_dir: str | Path, dtype: str = "float32", device: str = "cpu", max_seq_len: int | None = None
) -> tuple[BaseModel, EarlyExitModel]:
    """The base model and its exits, both from one `eetune export hf` dir."""
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    if not (export_dir / hfc.CONFIG_FILE).is_file() or manifest.get("tensor_prefix") is None:
        raise EetuneError(f"{export_dir} is a run dir, not an `eetune export hf` dir: load it with its base model")
    base = load_base_model(
        manifest["base_model"]["name"], checkpoint_dir=export_dir, dtype=dtype, max_seq_len=max_seq_len, device=device
    )
    return base, load_exits(export_dir, base.model, base.fingerprint)
