"""`eetune export draft|hf|gguf`: hand a run's exits to transformers, llama.cpp and friends.

- draft: layers 1..L + the exit at L as a standard Hugging Face causal LM dir (a speculative
  draft model for transformers' assisted generation, vLLM, ...).
- hf: the base checkpoint plus all exits in one Hugging Face dir that eetune loads back alone.
- gguf: the draft as a GGUF file for llama.cpp's speculative decoding.

Every check that needs no weights (run dir, exit layer, output path) runs before any weight is
read, so mistakes fail in a second. No format loads the base model: its fingerprint is checked one
tensor at a time, then `hf` copies its files and `draft`/`gguf` read just the tensors the draft
keeps, one at a time as they are written, so a base that fits no machine's memory exports too.
"""

from __future__ import annotations

import datetime as dt
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from eetune.config.schema import EetuneConfig
from eetune.console import make_console
from eetune.errors import EetuneError
from eetune.exits import read_manifest
from eetune.exits.checkpoint import check_base_fingerprint
from eetune.exits.spec import ExitSpec
from eetune.export.bundle import export_bundle
from eetune.export.draft import check_exportable, save_draft, stream_draft
from eetune.export.gguf_file import GGUF_DTYPES, save_draft_gguf
from eetune.models import DEFAULT_MODEL, ModelEntry, fingerprint, get_model_entry
from eetune.models import hf_config as hfc
from eetune.models.load import load_tokenizer, parse_dtype, resolve_checkpoint_dir
from eetune.parallel.load import CheckpointTensors
from eetune.rundir import resolve_run_dir

DRAFT_FORMAT = "eetune.draft/1"


@dataclass
class ExportResult:
    out: Path
    format: str
    base_checkpoint_dir: Path  # where the base weights were read
    exit_layer: int | None  # the draft's exit (draft, gguf)
    num_layers: int | None  # the draft's decoder layers (draft, gguf)


def run(cfg: EetuneConfig, console: Console | None = None) -> ExportResult:
    console = console or make_console()
    exp = cfg.export
    exp.run_dir = resolve_run_dir(exp.run_dir)
    fmt = exp.format
    if not exp.run_dir:
        raise EetuneError(f"no run dir: pass run_dir=<augment or tune run dir>, e.g. eetune export {fmt} run_dir=runs/quick ...")
    if not exp.out:
        what = "<file.gguf>" if fmt == "gguf" else "<new dir>"
        raise EetuneError(f"no output: pass out={what}")
    out = Path(exp.out)
    if out.exists():
        raise EetuneError(f"{out} already exists; delete it or choose another out=...")
    if fmt == "gguf" and out.suffix != ".gguf":
        raise EetuneError(f"out={out} must be a file name ending in .gguf")
    run_dir = Path(exp.run_dir)
    manifest = read_manifest(run_dir)
    exits = {int(spec["layer"]): spec["arch"] for spec in manifest["exits"]}
    if fmt in ("draft", "gguf"):
        if exp.exit is None:
            raise EetuneError(f"export {fmt} needs the drafting exit: pass exit=L, one of {sorted(exits)}")
        check_exportable(exits, int(exp.exit), str(run_dir))
    dtype = parse_dtype(exp.dtype)
    if fmt == "gguf" and dtype not in GGUF_DTYPES.values():
        raise EetuneError(f"GGUF export writes float32 or float16, not dtype={exp.dtype}")

    if fmt == "hf":
        return _export_bundle(cfg, manifest, run_dir, out, sorted(exits), console)
    layer = int(exp.exit)
    entry, checkpoint_dir, tensors = _base_tensors(cfg, manifest, run_dir)
    # Cheap checks first: config.json, the exit's weights and the tokenizer before the fingerprint.
    draft = stream_draft(entry.family, tensors, tensors.hf_config, run_dir, manifest, layer)
    load_tokenizer(checkpoint_dir)
    _check_fingerprint(run_dir, manifest, tensors, checkpoint_dir, console)
    spec = ExitSpec(**next(spec for spec in manifest["exits"] if int(spec["layer"]) == layer))
    with console.status(f"writing the layer-{layer} draft to {out}, one tensor at a time"):
        if fmt == "draft":
            save_draft(draft, entry.family, checkpoint_dir, out, dtype, _provenance(manifest, spec, run_dir, draft.num_layers))
        else:
            title = f"{entry.name} exit {layer} draft"
            save_draft_gguf(draft, entry.family, entry.name, checkpoint_dir, out, dtype, title)
    console.print(
        f"wrote {out}: layers 1..{layer} + the {spec.arch} exit at {layer} "
        f"({draft.num_layers} decoder layers, {'tied' if draft.tied else 'own'} head, {exp.dtype})", markup=False,
    )
    return ExportResult(out, fmt, checkpoint_dir, layer, draft.num_layers)


def _export_bundle(cfg: EetuneConfig, manifest: dict[str, Any], run_dir: Path, out: Path, exits: list[int],
                   console: Console) -> ExportResult:
    """`export hf`: the base files are copied, not loaded, so any size of base exports on any machine;
    its fingerprint is streamed one tensor at a time first."""
    _, checkpoint_dir, tensors = _base_tensors(cfg, manifest, run_dir)
    _check_fingerprint(run_dir, manifest, tensors, checkpoint_dir, console)
    with console.status(f"copying {checkpoint_dir} and the exits to {out}"):
        export_bundle(run_dir, checkpoint_dir, manifest, out)
    path = shlex.quote(str(out))
    console.print(
        f"wrote {out}: the base model + exits at {exits}; use it with: eetune generate "
        f"model.checkpoint_dir={path} generate.run_dir={path} --prompt 'Hi'", markup=False,
    )
    return ExportResult(out, "hf", checkpoint_dir, None, None)


def _base_tensors(cfg: EetuneConfig, manifest: dict[str, Any], run_dir: Path) -> tuple[ModelEntry, Path, CheckpointTensors]:
    """The base checkpoint's tensors, each read from its safetensors file only when asked for."""
    entry = get_model_entry(manifest["base_model"]["name"])
    checkpoint_dir = Path(resolve_checkpoint_dir(entry, _base_checkpoint_dir(cfg, manifest, run_dir)))
    return entry, checkpoint_dir, CheckpointTensors(entry.family, checkpoint_dir, hfc.read_hf_config(checkpoint_dir))


def _check_fingerprint(run_dir: Path, manifest: dict[str, Any], tensors: CheckpointTensors, checkpoint_dir: Path,
                       console: Console) -> None:
    """Refuse exits built on other weights; the fingerprint is streamed, one tensor in memory at a time."""
    with console.status(f"checking the base weights in {checkpoint_dir}, one tensor at a time"):
        check_base_fingerprint(run_dir, manifest, fingerprint(tensors), checkpoint_dir)


def _base_checkpoint_dir(cfg: EetuneConfig, manifest: dict[str, Any], run_dir: Path) -> str | None:
    """Where the base weights are: model.checkpoint_dir if given, else where the run loaded them."""
    if cfg.model.checkpoint_dir:
        return str(cfg.model.checkpoint_dir)
    name = manifest["base_model"]["name"]
    recorded = manifest["base_model"].get("checkpoint_dir")
    if recorded:
        path = run_dir / recorded  # an exported dir records "." (itself); absolute paths stay as they are
        if path.is_dir():
            return str(path)
    if name == DEFAULT_MODEL:
        return None  # the bundled model, wherever this machine keeps it
    raise EetuneError(
        f"the base model of {run_dir} was loaded from {recorded}, which does not exist here: "
        "pass model.checkpoint_dir=<that Hugging Face checkpoint dir>"
    )


def _provenance(manifest: dict[str, Any], spec: ExitSpec, run_dir: Path, num_layers: int) -> dict[str, Any]:
    base = manifest["base_model"]
    return {
        "format": DRAFT_FORMAT,
        "base_model": {"name": base["name"], "fingerprint": base["fingerprint"], "num_layers": base["num_layers"]},
        "exit": spec.to_dict(),
        "num_layers": num_layers,
        "run_dir": str(run_dir),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }

