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
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from eetune.errors import EetuneError
from eetune.exits import EarlyExitModel, exit_arch_names, get_exit_arch, lm_head_weight
from eetune.exits.checkpoint import EXPORT_CONFIG_KEY
from eetune.models import hf_config as hfc
from eetune.models.checkpoint import publish_dir, staging_dir, tune_to_hf_state_dict, write_safetensors
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
    """A draft decoder: its torchtune state dict and its Hugging Face config.json."""

    state_dict: dict[str, torch.Tensor]  # torchtune names
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
    """The sub-network "backbone layers 1..layer + the exit at layer" as a decoder's weights."""
    check_exportable({spec.layer: spec.arch for spec in model.specs}, layer, "this model")
    exit_ = model.exit(layer)
    arch = get_exit_arch(exit_.spec.arch)
    backbone = model.backbone.state_dict()
    state = {"tok_embeddings.weight": backbone["tok_embeddings.weight"]}
    state.update({k: v for k, v in backbone.items() if k.startswith("layers.") and int(k.split(".")[1]) < layer})

    exit_state = {k: v for k, v in exit_.state_dict().items() if not k.startswith("confidence.")}
    if arch.draft_layer is not None:
        extra = f"layers.{layer}."  # 0-based index of the added layer: right after backbone layer `layer`
        state.update({extra + k: v for k, v in arch.draft_layer(exit_state, backbone).items()})
    state["norm.scale"] = exit_state["norm.scale"]

    tied = exit_.head is None and "output.weight" not in backbone
    if exit_.head is not None:
        state["output.weight"] = exit_state["head.weight"]
    elif not tied:
        state["output.weight"] = lm_head_weight(model.backbone)

    num_layers = layer + arch.draft_extra_layers
    config = draft_config(base_config, layer, num_layers, tied)
    return Draft({k: v.detach() for k, v in state.items()}, config, num_layers, tied)


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
    tune_state = {name: tensor.to(dtype) for name, tensor in draft.state_dict.items()}
    hf_tensors = tune_to_hf_state_dict(family, tune_state, draft.hf_config)
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
        write_safetensors(hf_tensors, staged)
        (staged / hfc.CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        copy_tokenizer_files(checkpoint_dir, staged)
        publish_dir(staged, out_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return out_dir


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
