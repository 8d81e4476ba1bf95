"""Reading a Hugging Face ``config.json``: the file itself and the fields eetune needs.

Checkpoints on disk come from many transformers versions: 4.x writes ``rope_theta`` and
``rope_scaling`` at the top level, 5.x nests both in ``rope_parameters``. Everything that reads
RoPE settings goes through here so both spellings work.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eetune.errors import EetuneError

CONFIG_FILE = "config.json"

# Fields every decoder family needs; the rest have per-family defaults.
REQUIRED_KEYS: tuple[str, ...] = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)


def read_hf_config(checkpoint_dir: Path) -> dict[str, Any]:
    """Parse ``checkpoint_dir/config.json``; a missing or malformed file is a user error."""
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise EetuneError(
            f"{path} not found: a Hugging Face checkpoint dir needs a config.json next to its "
            "*.safetensors files; point model.checkpoint_dir at such a dir"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EetuneError(f"{path} is not valid JSON ({exc}); restore the checkpoint's config.json") from exc
    if not isinstance(config, dict):
        raise EetuneError(f"{path} must hold a JSON object; restore the checkpoint's config.json")
    return config


def require_keys(config: Mapping[str, Any], keys: tuple[str, ...] = REQUIRED_KEYS) -> None:
    missing = [key for key in keys if key not in config]
    if missing:
        raise EetuneError(
            f"config.json lacks {', '.join(missing)}; it does not describe a decoder LLM "
            "(restore the checkpoint's original config.json)"
        )


def num_layers(config: Mapping[str, Any]) -> int:
    """Number of transformer blocks."""
    return int(config["num_hidden_layers"])


def num_kv_heads(config: Mapping[str, Any]) -> int:
    """Key/value heads; configs of plain multi-head models may omit the field."""
    return int(config.get("num_key_value_heads") or config["num_attention_heads"])


def head_dim(config: Mapping[str, Any]) -> int:
    return int(config["hidden_size"]) // int(config["num_attention_heads"])


def rope_theta(config: Mapping[str, Any], default: float) -> float:
    """RoPE base, from ``rope_parameters`` (transformers 5) or ``rope_theta`` (4.x)."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(config.get("rope_theta", default))


def rope_scaling(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """RoPE scaling settings with ``rope_type`` set, or None for plain RoPE."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping):
        scaling = {key: value for key, value in params.items() if key != "rope_theta"}
    else:
        scaling = dict(config.get("rope_scaling") or {})
    # 4.x configs sometimes spell the kind as "type".
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return None
    scaling["rope_type"] = kind
    return scaling


def tie_word_embeddings(config: Mapping[str, Any]) -> bool:
    """Whether the LM head reuses the input embeddings (transformers' default: False)."""
    return bool(config.get("tie_word_embeddings", False))


def architecture(config: Mapping[str, Any]) -> str | None:
    """The model class name config.json declares, e.g. ``LlamaForCausalLM``."""
    archs = config.get("architectures") or []
    return str(archs[0]) if archs else None
