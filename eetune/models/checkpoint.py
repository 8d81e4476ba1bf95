"""Hugging Face checkpoint dirs <-> torchtune state dicts.

Reading goes through torchtune's ``FullModelHFCheckpointer`` so its per-family key mapping
(and Llama's q/k permutation) is the one used everywhere. Writing uses the same converters
directly: the checkpointer can only save what it loaded itself (it needs its weight map).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torchtune.training import FullModelHFCheckpointer, MODEL_KEY

from eetune.errors import EetuneError
from eetune.models import hf_config as hfc
from eetune.models.registry import ModelEntry, ModelFamily, resolve_family

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SAFETENSORS_INDEX = "model.safetensors.index.json"
# PEFT adapters sit next to base weights in some dirs, and `eetune export hf` dirs keep their
# exits beside them; neither is part of the base model.
_NOT_BASE_WEIGHTS = {"adapter_model.safetensors", "exits.safetensors"}


def find_safetensors(checkpoint_dir: Path) -> list[str]:
    """Names of the base-model ``*.safetensors`` files in ``checkpoint_dir`` (sorted)."""
    files = sorted(
        p.name for p in Path(checkpoint_dir).glob("*.safetensors") if p.name not in _NOT_BASE_WEIGHTS
    )
    if not files:
        raise EetuneError(
            f"no *.safetensors weights in {checkpoint_dir}; eetune reads Hugging Face checkpoints in "
            "safetensors format (convert .bin/.pth first, or import a GGUF file with `eetune import`)"
        )
    return files


def load_tune_state_dict(
    family: ModelFamily, checkpoint_dir: Path, hf_config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The checkpoint's weights in torchtune names, in the dtype they are stored in."""
    files = find_safetensors(checkpoint_dir)
    # The checkpointer insists on an output dir outside the checkpoint; loading writes nothing there.
    with tempfile.TemporaryDirectory(prefix="eetune-ckpt-") as scratch:
        checkpointer = FullModelHFCheckpointer(
            checkpoint_dir=str(checkpoint_dir),
            checkpoint_files=files,
            model_type=family.model_type,
            output_dir=scratch,
        )
        # The checkpointer indexes these keys directly; old configs omit them and transformers
        # then uses these defaults.
        checkpointer._config.setdefault("num_key_value_heads", hfc.num_kv_heads(hf_config))
        checkpointer._config.setdefault("tie_word_embeddings", hfc.tie_word_embeddings(hf_config))
        try:
            state_dict: dict[str, torch.Tensor] = checkpointer.load_checkpoint()[MODEL_KEY]
        except Exception as exc:  # torchtune raises bare Exception for unknown keys
            raise EetuneError(
                f"cannot read the weights in {checkpoint_dir} as a {family.name} checkpoint ({exc}); "
                "check that model.name matches the checkpoint"
            ) from exc
    if hfc.tie_word_embeddings(hf_config):
        # Some tied checkpoints still store lm_head (a copy of the embeddings); HF ignores it too.
        state_dict.pop("output.weight", None)
    return state_dict


def hf_to_tune_state_dict(
    family: ModelFamily, hf_tensors: Mapping[str, torch.Tensor], hf_config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """HF names -> torchtune names, with the converter FullModelHFCheckpointer uses for this family."""
    return family.hf_to_tune(hf_tensors, hf_config)


def tune_to_hf_state_dict(
    family: ModelFamily, state_dict: Mapping[str, torch.Tensor], hf_config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """torchtune names -> HF names, with the converter FullModelHFCheckpointer uses for this family."""
    return family.tune_to_hf(state_dict, hf_config)


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_safetensors(
    tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = 5 << 30
) -> list[str]:
    """Write HF-named tensors as ``model.safetensors`` or HF-style shards plus an index."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    return names


def staging_dir(out_dir: Path) -> Path:
    """A fresh temp dir beside ``out_dir``: same filesystem, so the final rename is atomic."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    path = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def publish_dir(staged: Path, out_dir: Path) -> None:
    """Move a finished staging dir to ``out_dir`` in one rename."""
    if out_dir.exists():
        raise EetuneError(f"{out_dir} already exists; delete it or choose another output dir")
    # safetensors' save_file creates files readable by their owner only; give them the usual mode.
    mask = os.umask(0)
    os.umask(mask)
    for path in staged.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~mask)
    staged.rename(out_dir)


def save_hf_checkpoint(
    model: torch.nn.Module,
    entry_or_family: ModelEntry | ModelFamily | str,
    hf_config: Mapping[str, Any],
    out_dir: Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_shard_bytes: int = 5 << 30,
) -> Path:
    """Save a torchtune decoder as a Hugging Face checkpoint dir (atomically).

    Writes safetensors (no ``lm_head`` for tied-embedding models), ``config.json`` (``hf_config``
    with the family's architecture and the weights' dtype), and the tokenizer if given.
    """
    family = resolve_family(entry_or_family)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise EetuneError(f"{out_dir} already exists; delete it or choose another output dir")
    hf_tensors = tune_to_hf_state_dict(family, model.state_dict(), hf_config)
    dtypes = {t.dtype for t in hf_tensors.values()}
    config = dict(hf_config)
    config.setdefault("architectures", [family.hf_architecture])
    config.setdefault("model_type", family.hf_model_type)
    if len(dtypes) == 1:
        # transformers 5 reads "dtype", 4.x "torch_dtype"; keep both in step.
        config["dtype"] = config["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
    staged = staging_dir(out_dir)
    try:
        write_safetensors(hf_tensors, staged, max_shard_bytes)
        (staged / hfc.CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staged))
        publish_dir(staged, out_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return out_dir
