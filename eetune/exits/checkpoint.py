"""Exit checkpoints: `exits.safetensors` (exit weights only) + `manifest.json`.

The manifest names the base model by fingerprint, so exits are never silently loaded onto
weights they were not built for.

An `eetune export hf` dir is a Hugging Face checkpoint that carries its exits: the manifest sits
in config.json under `EXPORT_CONFIG_KEY`, and `exits.safetensors` holds the same tensors with
their names prefixed (`tensor_prefix`). Everything that reads a run dir reads such a dir too.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torchtune.modules import TransformerDecoder

from eetune.errors import EetuneError
from eetune.exits.model import EarlyExitModel
from eetune.exits.spec import ExitSpec
from eetune.rundir import atomic_write, atomic_write_json, git_revision, package_versions

EXITS_FILE = "exits.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "eetune.exits/1"
EXPORT_CONFIG_KEY = "eetune"


def build_manifest(model: EarlyExitModel, base: dict[str, Any], stage: str, extra: dict | None = None) -> dict:
    """`base`: {name, fingerprint, num_layers, checkpoint_dir} of the frozen model."""
    return {
        "format": FORMAT,
        "stage": stage,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "base_model": base,
        "exits": [spec.to_dict() for spec in model.specs],
        "exit_parameters": sum(p.numel() for p in model.exits.parameters()),
        "versions": package_versions(),
        "git_revision": git_revision(),
        **(extra or {}),
    }


def save_exits(run_dir: Path, model: EarlyExitModel, manifest: dict) -> None:
    """Write the exit weights and the manifest, each atomically."""
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.exits.state_dict().items()}
    metadata = {"format": FORMAT, "base_fingerprint": manifest["base_model"]["fingerprint"]}
    atomic_write(Path(run_dir) / EXITS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    atomic_write_json(Path(run_dir) / MANIFEST_FILE, manifest)


def read_manifest(run_dir: str | Path) -> dict:
    """The manifest of a run dir, or of an `eetune export hf` dir (from its config.json)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EetuneError(f"run dir not found: {run_dir}")
    path = run_dir / MANIFEST_FILE
    if path.is_file():
        manifest = _read_json(path)
    else:
        manifest = _exported_manifest(run_dir)
        path = run_dir / "config.json"
        if manifest is None:
            raise EetuneError(
                f"{run_dir} has no {MANIFEST_FILE}: is it an eetune run dir (from augment or tune) "
                "or an `eetune export hf` dir?"
            )
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise EetuneError(f"{path} has format {found!r}; this eetune reads {FORMAT!r}")
    return manifest


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EetuneError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _exported_manifest(export_dir: Path) -> dict | None:
    """The manifest an `eetune export hf` dir keeps in its config.json, or None."""
    config_path = export_dir / "config.json"
    if not config_path.is_file():
        return None
    config = _read_json(config_path)
    return config.get(EXPORT_CONFIG_KEY) if isinstance(config, dict) else None


def check_base_fingerprint(
    run_dir: str | Path, manifest: dict, fingerprint: str, checkpoint_dir: str | Path | None = None,
) -> None:
    """Fail clearly when the base weights (`fingerprint`, read from `checkpoint_dir`) are not the
    ones the run's exits were built on."""
    base = manifest["base_model"]
    expected = base["fingerprint"]
    if expected != fingerprint:
        built_dir = base.get("checkpoint_dir")  # absent from manifests written before it was recorded
        built_on = f"from {built_dir}" if built_dir else "from a checkpoint dir its manifest does not record"
        loaded = "the loaded base model" if checkpoint_dir is None else f"the base model loaded from {checkpoint_dir}"
        fix = f"model.checkpoint_dir={built_dir}" if built_dir else "model.checkpoint_dir=..."
        raise EetuneError(
            f"exits in {run_dir} were built on {base.get('name')} weights {built_on} (fingerprint {expected}), "
            f"but {loaded} has fingerprint {fingerprint}: load the weights the exits were built on ({fix})"
        )


def load_exits(
    run_dir: str | Path, backbone: TransformerDecoder, fingerprint: str, checkpoint_dir: str | Path | None = None,
) -> EarlyExitModel:
    """Rebuild the run's exits on `backbone` (loaded from `checkpoint_dir`) and load their weights.

    Fails clearly when the run was made for other base weights (fingerprints differ).
    """
    manifest = read_manifest(run_dir)
    check_base_fingerprint(run_dir, manifest, fingerprint, checkpoint_dir)
    specs = [ExitSpec(**spec) for spec in manifest["exits"]]
    model = EarlyExitModel(backbone, specs)
    path = Path(run_dir) / EXITS_FILE
    try:
        state = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise EetuneError(f"cannot read {path}: {exc}") from None
    prefix = manifest.get("tensor_prefix", "")
    state = {name.removeprefix(prefix): tensor for name, tensor in state.items()}
    try:
        missing, unexpected = model.exits.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise EetuneError(f"{path} does not match its manifest's exits: {str(exc).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise EetuneError(
            f"{path} does not match its manifest's exits (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    dtype = next(backbone.parameters()).dtype
    model.exits.to(dtype)
    return model
