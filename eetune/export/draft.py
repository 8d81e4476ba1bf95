"""The draft sub-network "layers 1..L + the exit at L" as a plain decoder of the base's family.

Every exit architecture that ends in a norm is exactly a shorter decoder of the same family; its
record in `eetune.exits.archs` says how (`draft_layer`, `draft_refusal`):

- `norm`: layers 1..L, with the exit's norm (and head) as the final norm (and head).
- `layer`: the exit's block is one more decoder layer, L + 1 in all.
- `mlp`: one more layer whose attention adds nothing (all attention projections zero, so the
  residual stream passes through it unchanged) and whose MLP and MLP norm are the exit's.

An `embedding` exit applies its head to the raw layer output. A decoder always normalises before
its head, and RMSNorm rescales every token to unit RMS, so no weights reproduce it: it is refused.
A learned confidence estimator is not part of a causal LM and is left out of the draft.

A draft's weights are read only when written (`eetune.export.lazy`), one tensor at a time:
`stream_draft` reads them from the base checkpoint and the run's exits, so a draft of a base that
fits no machine's memory exports on any machine; `build_draft` takes them from a model in memory.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from torchtune.modules import TransformerDecoder

from eetune.errors import EetuneError
from eetune.exits import EXITS_FILE, EarlyExitModel, ExitArch, ExitSpec, build_exit, exit_arch_names, get_exit_arch
from eetune.exits.checkpoint import EXPORT_CONFIG_KEY
from eetune.export.lazy import LazyTensors, write_safetensors
from eetune.models import hf_config as hfc
from eetune.models.checkpoint import publish_dir, staging_dir, tune_to_hf_state_dict
from eetune.models.registry import ModelFamily

# config.json key of a draft's provenance (base fingerprint, exit spec, source run).
DRAFT_CONFIG_KEY = "eetune_draft"
# What a draft dir copies from the base checkpoint dir: the tokenizer, whatever files it has.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
# Per-layer lists some config.json files carry (transformers 5: attention kind of each layer).
_PER_LAYER_KEYS = ("layer_types",)


@dataclass
class Draft:
    """A draft decoder: its torchtune weights, each read only when written, and its config.json."""

    state_dict: LazyTensors  # torchtune names
    hf_config: dict[str, Any]
    num_layers: int
    tied: bool  # the head is the input embedding matrix (no separate output weight)


def check_exportable(model_exits: Mapping[int, str], layer: int, source: str) -> None:
    """Refuse an exit layer the run does not have, or an exit no decoder can express.

    ``model_exits`` maps exit layer -> arch (from a manifest, before any weights are loaded).
    """
    if layer not in model_exits:
        raise EetuneError(
            f"{source} has no exit at layer {layer}; its exits are at {sorted(model_exits)}: pass one of them as exit=L"
        )
    arch = get_exit_arch(model_exits[layer])
    if not arch.exportable:
        fine = [name for name in exit_arch_names() if get_exit_arch(name).exportable]
        kinds = ", ".join(fine[:-1]) + " or " + fine[-1] if len(fine) > 1 else "".join(fine)
        raise EetuneError(
            f"the exit at layer {layer} is an '{arch.name}' exit ({arch.draft_refusal}), which no "
            f"standard causal LM can express exactly (its final RMSNorm always rescales): export a {kinds} exit"
        )


def build_draft(model: EarlyExitModel, layer: int, base_config: Mapping[str, Any]) -> Draft:
    """The sub-network "backbone layers 1..layer + the exit at layer" of a model in memory."""
    check_exportable({spec.layer: spec.arch for spec in model.specs}, layer, "this model")
    exit_ = model.exit(layer)
    base, exit_state = LazyTensors(), LazyTensors()
    for name, tensor in model.backbone.state_dict().items():
        base.add_tensor(name, tensor.detach())
    for name, tensor in exit_.state_dict().items():
        if not name.startswith("confidence."):
            exit_state.add_tensor(name, tensor.detach())
    return _assemble(base, exit_state, get_exit_arch(exit_.spec.arch), layer, base_config)


def stream_draft(
    family: ModelFamily,
    base: Mapping[str, torch.Tensor],
    base_config: Mapping[str, Any],
    run_dir: Path,
    manifest: Mapping[str, Any],
    layer: int,
) -> Draft:
    """The same draft from files, for a base that need not fit in memory.

    ``base``: the checkpoint's tensors by torchtune name, each read when asked for
    (`eetune.parallel.load.CheckpointTensors`). Only the embeddings, layers 0..layer-1 and the head
    the exit uses are read from it (and only when written); the exit's weights are read from the
    run's exits.safetensors, which holds every weight of an exit, copied ones included.
    """
    check_exportable({int(spec["layer"]): spec["arch"] for spec in manifest["exits"]}, layer, str(run_dir))
    spec = ExitSpec(**next(spec for spec in manifest["exits"] if int(spec["layer"]) == layer))
    # The base as torchtune builds it from config.json, on the meta device: every name and shape, no memory.
    with torch.device("meta"):
        backbone = family.build(base_config, 1)
    shapes = backbone.state_dict()
    missing, unexpected = sorted(shapes.keys() - base.keys()), sorted(base.keys() - shapes.keys())
    if missing or unexpected:
        raise EetuneError(
            f"the checkpoint's weights do not fit its config.json as a {family.name} model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    lazy_base = LazyTensors()
    for name, meta in shapes.items():
        lazy_base.add(name, meta, partial(base.__getitem__, name))
    exit_state = _read_exit(Path(run_dir), manifest, spec, backbone)
    return _assemble(lazy_base, exit_state, get_exit_arch(spec.arch), layer, base_config)


def _read_exit(run_dir: Path, manifest: Mapping[str, Any], spec: ExitSpec, backbone: TransformerDecoder) -> LazyTensors:
    """Exit ``spec``'s weights in exits.safetensors (confidence estimator left out), read when asked
    for; their names and shapes are checked against the exit the manifest describes, built on the
    meta ``backbone``."""
    path = run_dir / EXITS_FILE
    prefix = f"{manifest.get('tensor_prefix', '')}{spec.layer}."
    try:
        handle = safe_open(str(path), framework="pt")
        shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys() if key.startswith(prefix)}
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise EetuneError(f"cannot read {path}: {exc}") from None
    metas = {key.removeprefix(prefix): torch.empty(shape, device="meta") for key, shape in shapes.items()}
    module = build_exit(spec, backbone)
    try:
        missing, unexpected = module.load_state_dict(metas, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        raise EetuneError(f"{path} does not match its manifest's exits: {str(exc).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise EetuneError(
            f"{path} does not match its manifest's exits (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    state = LazyTensors()
    for name in module.state_dict():  # the module's order, as build_draft's
        meta = metas[name]
        if not name.startswith("confidence."):
            state.add(name, meta, partial(handle.get_tensor, prefix + name))
    return state


def _assemble(
    base: LazyTensors, exit_state: LazyTensors, arch: ExitArch, layer: int, base_config: Mapping[str, Any]
) -> Draft:
    """Backbone layers 1..layer + the exit at layer, as a decoder's (lazy) weights."""
    state = LazyTensors()

    def keep(source: LazyTensors, name: str, as_name: str | None = None) -> None:
        state.add(as_name or name, source.meta(name), partial(source.__getitem__, name))

    keep(base, "tok_embeddings.weight")
    for name in base:
        if name.startswith("layers.") and int(name.split(".")[1]) < layer:
            keep(base, name)
    if arch.draft_layer is not None:
        extra = f"layers.{layer}."  # 0-based index of the added layer: right after backbone layer `layer`
        added = _draft_layer(arch, exit_state, base)
        for name in added:
            keep(added, name, extra + name)
    keep(exit_state, "norm.scale")

    own_head = "head.weight" in exit_state
    tied = not own_head and "output.weight" not in base
    if own_head:
        keep(exit_state, "head.weight", "output.weight")
    elif not tied:
        keep(base, "output.weight")

    num_layers = layer + arch.draft_extra_layers
    return Draft(state, draft_config(base_config, layer, num_layers, tied), num_layers, tied)


def _draft_layer(arch: ExitArch, exit_state: LazyTensors, base: LazyTensors) -> LazyTensors:
    """The exit's added decoder layer (names relative to it), reading as little as it can.

    ``arch.draft_layer`` mostly passes exit weights through: called on meta stand-ins of them, it
    shows which, and those stay unread until written. What it computes (an attention half that
    adds nothing) is computed now, from the base's layer 0: the backbone tensors it is given.
    """
    stand_ins = {name: exit_state.meta(name) for name in exit_state}
    layer0 = LazyTensors()  # read only if it is looked at
    for name in base:
        if name.startswith("layers.0."):
            layer0.add(name, base.meta(name), partial(base.__getitem__, name))
    made = arch.draft_layer(stand_ins, layer0)
    source = {id(tensor): name for name, tensor in stand_ins.items()}
    if any(tensor.is_meta and id(tensor) not in source for tensor in made.values()):
        made = arch.draft_layer(dict(exit_state), layer0)  # computed from the exit's weights: use the real ones
    out = LazyTensors()
    for name, tensor in made.items():
        if id(tensor) in source:
            out.add(name, tensor, partial(exit_state.__getitem__, source[id(tensor)]))
        else:
            out.add_tensor(name, tensor.detach())
    return out


def draft_config(base_config: Mapping[str, Any], kept: int, num_layers: int, tied: bool) -> dict[str, Any]:
    """The base's config.json for ``kept`` backbone layers (+ the exit's) with a tied or own head."""
    config = {k: v for k, v in base_config.items() if k != EXPORT_CONFIG_KEY}
    config["num_hidden_layers"] = num_layers
    config["tie_word_embeddings"] = tied
    for key in _PER_LAYER_KEYS:
        per_layer = config.get(key)
        if isinstance(per_layer, list) and per_layer:
            # An added layer is a copy of the last backbone layer (`layer`) or attends to nothing (`mlp`).
            config[key] = per_layer[:kept] + [per_layer[-1]] * (num_layers - kept)
    hfc.require_keys(config)
    return config


def save_draft(
    draft: Draft,
    family: ModelFamily,
    checkpoint_dir: Path,
    out_dir: Path,
    dtype: torch.dtype,
    provenance: Mapping[str, Any],
) -> Path:
    """Write ``draft`` as a Hugging Face checkpoint dir (atomically), with the base's tokenizer.

    ``provenance`` (base fingerprint, exit spec, source run) goes into config.json under
    ``DRAFT_CONFIG_KEY``; transformers keeps unknown keys and ignores them.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise EetuneError(f"{out_dir} already exists; delete it or choose another out=...")
    tensors = hf_tensors(draft, family, dtype)
    config = {
        **draft.hf_config,
        "architectures": [family.hf_architecture],
        "model_type": family.hf_model_type,
        DRAFT_CONFIG_KEY: dict(provenance),
    }
    # transformers 5 reads "dtype", 4.x "torch_dtype"; keep both in step.
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
    staged = staging_dir(out_dir)
    try:
        write_safetensors(tensors, staged)
        (staged / hfc.CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        copy_tokenizer_files(checkpoint_dir, staged)
        publish_dir(staged, out_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return out_dir


def hf_tensors(draft: Draft, family: ModelFamily, dtype: torch.dtype) -> LazyTensors:
    """The draft's weights under Hugging Face names, each cast to ``dtype`` and converted (Llama's
    q/k permutation) only when read."""
    out = LazyTensors()
    for name in draft.state_dict:
        meta = draft.state_dict.meta(name).to(dtype)
        ((hf_name, hf_meta),) = tune_to_hf_state_dict(family, {name: meta}, draft.hf_config).items()

        def read(name: str = name, hf_name: str = hf_name) -> torch.Tensor:
            tensor = draft.state_dict[name].to(dtype)
            return tune_to_hf_state_dict(family, {name: tensor}, draft.hf_config)[hf_name]

        out.add(hf_name, hf_meta, read)
    return out


def copy_tokenizer_files(checkpoint_dir: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer (whichever of its files exist) and the generation config."""
    copied = []
    for name in TOKENIZER_FILES:
        source = Path(checkpoint_dir) / name
        if source.is_file():
            shutil.copyfile(source, Path(out_dir) / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        raise EetuneError(
            f"{checkpoint_dir} has no tokenizer.json or tokenizer.model to copy; restore the base "
            "model's tokenizer files there"
        )
    return copied
