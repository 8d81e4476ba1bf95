"""The typed config schema: one dataclass per section, registered in Hydra's ConfigStore.

Recipes (`recipes/*.yaml`) and groups (`configs/<group>/*.yaml`) are merged onto these
dataclasses, so an unknown key or a wrongly typed value fails at composition time.
Allowed values of string fields are listed in `CHOICES` and checked by `validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class ModelConfig:
    """The frozen base model."""

    # Registry name (`eetune.models.list_models()`): picks the torchtune builder.
    name: str = "smollm2_135m"
    # Local Hugging Face checkpoint dir; None means the embedded SmolLM2 default.
    checkpoint_dir: Optional[str] = None
    dtype: str = "float32"
    # Longest sequence the model is built for (RoPE cache and KV cache size).
    max_seq_len: int = 2048


@dataclass
class ExitsConfig:
    """Where the early exits sit and what they are (DESIGN.md §3)."""

    # 1-based layer numbers: an exit reads the output of that layer (1..n_layers-1).
    layers: List[int] = field(default_factory=lambda: [8, 16, 24])
    arch: str = "mlp"
    init: str = "copy"
    # `shared` reuses the frozen LM head (cheap; the paper's tied-embedding setting),
    # `copy` gives each exit its own trainable copy of it.
    head: str = "shared"
    # Std of the normal init for `random` exits.
    init_std: float = 0.02


@dataclass
class DataConfig:
    """Text the stages read: tuning data and the held-out split used to score exits."""

    # pydoc: the Python stdlib's `pydoc_data` topics (real English, no download);
    # text: a plain text file; jsonl: one JSON object per line with a text field.
    source: str = "pydoc"
    path: Optional[str] = None
    text_field: str = "text"
    seq_len: int = 256
    # Held-out text: the last `heldout_fraction` of the corpus, never trained on.
    heldout_fraction: float = 0.05
    # How many held-out sequences of `seq_len` tokens score each exit.
    heldout_sequences: int = 4


@dataclass
class GenerateConfig:
    """Decoding settings for `eetune generate`."""

    prompt: Optional[str] = None
    # Wrap the prompt in the tokenizer's chat template as one user message.
    chat: bool = True
    system: Optional[str] = None
    max_new_tokens: int = 128
    # 0 means greedy.
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0


@dataclass
class EetuneConfig:
    """Everything a stage reads. The CLI sets `stage`; recipes set the rest."""

    stage: str = "augment"
    # Where the stage writes its results; created fresh, never overwritten.
    run_dir: str = "runs/${stage}-${now:%Y%m%d-%H%M%S}"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    exits: ExitsConfig = field(default_factory=ExitsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


# Closed sets of values for string fields, checked after composition.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "exits.arch": ("embedding", "norm", "mlp", "layer"),
    "exits.init": ("random", "copy"),
    "exits.head": ("shared", "copy"),
    "data.source": ("pydoc", "text", "jsonl"),
}

SCHEMA_NAME = "eetune_schema"


def register_schema() -> None:
    """Store the schema so recipes can list it first in their defaults."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=EetuneConfig)
