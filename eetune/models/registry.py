"""Model families and named models: look them up by name (the table: eetune.models.catalog).

The architecture of a loaded model always comes from the checkpoint's own ``config.json``: any
size of a family loads under any of its names. ``ModelEntry`` reference configs let code plan
(memory, exit positions) without the checkpoint.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from torchtune.modules import TransformerDecoder

from eetune.errors import EetuneError
from eetune.models.catalog import FAMILIES, MODELS
from eetune.models.family import ModelEntry, ModelFamily, check_family_matches, param_count

__all__ = [
    "DEFAULT_MODEL", "ModelEntry", "ModelFamily", "build_decoder", "check_family_matches", "get_family",
    "get_model_entry", "list_families", "list_models", "param_count", "resolve_family",
]

DEFAULT_MODEL = "smollm2_135m"


def _normalise(name: str) -> str:
    # Accept the spellings people type from HF repo names: "SmolLM2-135M", "qwen2.5-0.5b".
    return name.strip().lower().replace("-", "_").replace(".", "_")


def list_models() -> list[str]:
    return list(MODELS)


def list_families() -> list[str]:
    return list(FAMILIES)


def get_model_entry(name: str) -> ModelEntry:
    """The registered model ``name``; an unknown name lists close matches and all names."""
    entry = MODELS.get(_normalise(name))
    if entry is not None:
        return entry
    close = difflib.get_close_matches(_normalise(name), list(MODELS), n=3, cutoff=0.5)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise EetuneError(f"unknown model {name!r}{hint}; available models: {', '.join(MODELS)}")


def get_family(name: str) -> ModelFamily:
    family = FAMILIES.get(_normalise(name))
    if family is None:
        raise EetuneError(f"unknown model family {name!r}; available families: {', '.join(FAMILIES)}")
    return family


def resolve_family(entry_or_family: ModelEntry | ModelFamily | str) -> ModelFamily:
    """A family from an entry, a family, a family name or a model name."""
    if isinstance(entry_or_family, ModelFamily):
        return entry_or_family
    if isinstance(entry_or_family, ModelEntry):
        return entry_or_family.family
    family = FAMILIES.get(_normalise(entry_or_family))
    return family if family is not None else get_model_entry(entry_or_family).family


def build_decoder(
    entry_or_family: ModelEntry | ModelFamily | str, hf_config: Mapping[str, Any], max_seq_len: int
) -> TransformerDecoder:
    """A randomly initialised torchtune decoder shaped by ``hf_config`` (a config.json dict)."""
    return resolve_family(entry_or_family).build(hf_config, max_seq_len)

