"""The `model` and `exits` sections: the frozen base model and the exits added to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from eetune.config.checks import check_choices, check_positive
from eetune.errors import EetuneError


@dataclass
class ModelConfig:
    """The frozen base model."""

    # Registry name (`eetune.models.list_models()`): picks the torchtune builder.
    name: str = "smollm2_135m"
    # Local Hugging Face checkpoint dir; None means the embedded SmolLM2 default.
    checkpoint_dir: Optional[str] = None
    # float32, bfloat16, float16, or auto: bfloat16 where the device computes it natively, else
    # float32 (fixed when the config is composed; `plan` sizes GPUs, so auto is bfloat16 there).
    dtype: str = "float32"
    # cpu, cuda, cuda:1, ...
    device: str = "cpu"
    # Longest sequence the model is built for (RoPE cache and KV cache size).
    max_seq_len: int = 2048

    def validate(self) -> None:
        check_choices(self, "model")
        check_positive(self, "model", "max_seq_len")


@dataclass
class ExitsConfig:
    """Where the early exits sit and what they are (the README's "Exits" table)."""

    # 1-based layer numbers: an exit reads the output of that layer (1..n_layers-1).
    layers: List[int] = field(default_factory=lambda: [8, 16, 24])
    arch: str = "mlp"
    init: str = "copy"
    # `shared` reuses the frozen LM head (cheap; the paper's tied-embedding setting),
    # `copy` gives each exit its own trainable copy of it.
    head: str = "shared"
    # Std of the normal init for `random` exits.
    init_std: float = 0.02
    # init=copy: `copy` takes the norms from the backbone too, `ones` starts them at identity.
    norm_init: str = "copy"
    # A tiny learned estimator per exit that predicts "my top-1 equals the final layer's",
    # so inference can skip the vocabulary head where it would not exit: none, linear, mlp.
    confidence: str = "none"

    def validate(self) -> None:
        check_choices(self, "exits")
        layers = list(self.layers)
        if not layers:
            raise EetuneError("exits.layers is empty: give at least one layer, e.g. exits.layers=[8,16,24]")
        if len(set(layers)) != len(layers):
            raise EetuneError(f"exits.layers={layers} has duplicates: each layer holds at most one exit")
