"""The value checks the config sections share: the closed sets of string values (`CHOICES`)
and the one-line `EetuneError` messages that name the failing key."""

from __future__ import annotations

from typing import Any

from eetune.errors import EetuneError
from eetune.exits.spec import ARCHS, HEADS, INITS, NORM_INITS
from eetune.exits.spec import CONFIDENCES as ESTIMATORS
from eetune.infer.draft_schedule import SCHEDULES
from eetune.infer.policy import CONFIDENCES, MODES

# Closed sets of values for string fields, checked after composition.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "exits.arch": ARCHS,
    "exits.init": INITS,
    "exits.head": HEADS,
    "exits.norm_init": NORM_INITS,
    "exits.confidence": ESTIMATORS,
    # Decoding choices: the exit policy's own lists (eetune.infer.policy).
    "generate.mode": MODES,
    "generate.confidence": CONFIDENCES,
    "generate.draft_schedule": SCHEDULES,
    "serve.mode": MODES,
    "serve.confidence": CONFIDENCES,
    "serve.draft_schedule": SCHEDULES,
    "serve.log_level": ("critical", "error", "warning", "info", "debug"),
    "data.source": ("pydoc", "text", "jsonl", "hf"),
    "data.heldout_by": ("tail", "prompt"),
    "data.cache_dtype": ("compute", "bfloat16"),
    "data.hf_format": ("json", "csv", "parquet", "text"),
    "optim.decay": ("cosine", "linear", "constant"),
    "loss.weighting": ("constant", "linear", "cosine", "dynamic"),
    "loss.ce_target": ("labels", "teacher"),
    "logger.kind": ("none", "wandb"),
    "export.format": ("draft", "hf", "gguf"),
    "export.dtype": ("float32", "bfloat16", "float16"),
    "parallel.backend": ("auto", "gloo", "nccl"),
    "plan.workload": ("tune", "serve"),
}


def check_choices(section: Any, name: str, *fields: str) -> None:
    """The `CHOICES` of section `name` (e.g. "model": model.dtype); with `fields`, only theirs."""
    for key, allowed in CHOICES.items():
        head, _, field_name = key.partition(".")
        if head == name and (not fields or field_name in fields) and getattr(section, field_name) not in allowed:
            raise EetuneError(f"{key}={getattr(section, field_name)!r} is not one of: {', '.join(allowed)}")


def check_positive(section: Any, name: str, *fields: str) -> None:
    for field_name in fields:
        value = getattr(section, field_name)
        if value <= 0:
            raise EetuneError(f"{name}.{field_name}={value} must be positive")
