"""What a model family and a named model are, and the code every family shares.

A ``ModelFamily`` is one torchtune component builder plus what is needed to read a Hugging Face
checkpoint of that architecture: how ``config.json`` maps to builder kwargs (with the checks
that the builder really implements what the config asks for), the ``FullModelHFCheckpointer``
model_type, the HF class name, the state-dict converters, its llama.cpp (GGUF) names, and a tiny
config for tests. A ``ModelEntry`` is a named, real size of a family with its reference
``config.json`` values. The families and models themselves are the table in
``eetune.models.catalog``; lookups are ``eetune.models.registry``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torchtune.models import convert_weights
from torchtune.modules import TransformerDecoder

from eetune.errors import EetuneError
from eetune.models import hf_config as hfc

# torchtune's Llama3ScaledRoPE hard-codes these; a config asking for others would silently differ.
_LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

KwargsFn = Callable[[Mapping[str, Any], int], dict[str, Any]]
# (tensors, HF config.json) -> the same tensors under the other side's names.
Converter = Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], dict[str, torch.Tensor]]


def llama_hf_to_tune(hf_tensors: Mapping[str, torch.Tensor], hf_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """HF -> torchtune names for Llama-style checkpoints (torchtune's default converter)."""
    return convert_weights.hf_to_tune(
        dict(hf_tensors), num_heads=int(hf_config["num_attention_heads"]), num_kv_heads=hfc.num_kv_heads(hf_config),
        dim=int(hf_config["hidden_size"]), head_dim=hf_config.get("head_dim"),
    )


def llama_tune_to_hf(state_dict: Mapping[str, torch.Tensor], hf_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return convert_weights.tune_to_hf(
        dict(state_dict), num_heads=int(hf_config["num_attention_heads"]), num_kv_heads=hfc.num_kv_heads(hf_config),
        dim=int(hf_config["hidden_size"]), head_dim=hf_config.get("head_dim"),
    )


@dataclass(frozen=True, eq=False)
class ModelFamily:
    """One decoder architecture as torchtune builds it and Hugging Face stores it."""

    name: str
    builder: Callable[..., TransformerDecoder]
    kwargs_fn: KwargsFn  # HF config.json + max_seq_len -> builder kwargs; raises EetuneError
    model_type: str  # torchtune FullModelHFCheckpointer model_type
    hf_architecture: str
    hf_model_type: str
    qkv_bias: bool
    tiny_config: Mapping[str, Any]
    # HF names <-> torchtune names: the converters torchtune's FullModelHFCheckpointer uses.
    hf_to_tune: Converter = llama_hf_to_tune
    tune_to_hf: Converter = llama_tune_to_hf
    # llama.cpp's architecture for this family's GGUF files (None: eetune cannot write GGUF).
    gguf_arch: Optional[str] = None
    # llama.cpp's pre-tokenizer name (text splitting before BPE; not readable off tokenizer.json).
    gguf_pre_tokenizer: str = "default"

    def decoder_kwargs(self, config: Mapping[str, Any], max_seq_len: int) -> dict[str, Any]:
        """Builder kwargs for ``config``, after checking it is this family and buildable."""
        check_family_matches(self, config)
        hfc.require_keys(config)
        _check_shapes(self, config)
        if max_seq_len < 1:
            raise EetuneError(f"max_seq_len must be a positive integer, got {max_seq_len}")
        return self.kwargs_fn(config, max_seq_len)

    def build(self, config: Mapping[str, Any], max_seq_len: int) -> TransformerDecoder:
        return self.builder(**self.decoder_kwargs(config, max_seq_len))


@dataclass(frozen=True, eq=False)
class ModelEntry:
    """A named model: its family and the reference config.json of its real size."""

    name: str
    family: ModelFamily
    hf_repo: str  # where the reference config comes from; documentation only, never fetched
    reference_config: Mapping[str, Any]
    gguf_pre_tokenizer: Optional[str] = None  # overrides the family's (e.g. SmolLM2's own "smollm")

    @property
    def num_layers(self) -> int:
        return hfc.num_layers(self.reference_config)

    @property
    def num_params(self) -> int:
        return param_count(self.family, self.reference_config)



# ---------------------------------------------------------------------------------------------
# config.json -> builder kwargs: the parts families share


def common_kwargs(config: Mapping[str, Any], max_seq_len: int) -> dict[str, Any]:
    return {
        "vocab_size": int(config["vocab_size"]),
        "num_layers": hfc.num_layers(config),
        "num_heads": int(config["num_attention_heads"]),
        "num_kv_heads": hfc.num_kv_heads(config),
        "embed_dim": int(config["hidden_size"]),
        "intermediate_dim": int(config["intermediate_size"]),
        "max_seq_len": int(max_seq_len),
        # transformers' default for all these families when the field is absent.
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
    }


def require_plain_rope(family: str, config: Mapping[str, Any]) -> None:
    scaling = hfc.rope_scaling(config)
    if scaling is not None:
        raise EetuneError(
            f"config.json asks for RoPE scaling {scaling['rope_type']!r}, which torchtune's {family} "
            "builder does not implement; use a checkpoint without rope_scaling or a family that has it"
        )


def require_untied(family: str, config: Mapping[str, Any], tied_alternative: str) -> None:
    if hfc.tie_word_embeddings(config):
        raise EetuneError(
            f"config.json sets tie_word_embeddings=true, which torchtune's {family} builder does not "
            f"support; load this checkpoint with a {tied_alternative} model name"
        )


def llama3_scale_factor(config: Mapping[str, Any]) -> float:
    """RoPE scale factor for Llama3ScaledRoPE; 1.0 (no scaling) when the config has none."""
    scaling = hfc.rope_scaling(config)
    if scaling is None:
        return 1.0
    if scaling["rope_type"] != "llama3":
        raise EetuneError(
            f"config.json asks for RoPE scaling {scaling['rope_type']!r}; the llama3 builders only "
            "implement 'llama3' scaling (or none)"
        )
    for key, expected in _LLAMA3_ROPE_FIXED.items():
        if key in scaling and float(scaling[key]) != expected:
            raise EetuneError(
                f"config.json rope_scaling.{key}={scaling[key]}, but torchtune's Llama3ScaledRoPE "
                f"fixes it at {expected:g}; this checkpoint cannot be built exactly"
            )
    return float(scaling.get("factor", 8.0))



# ---------------------------------------------------------------------------------------------
# checks shared by all families


def check_family_matches(family: ModelFamily, config: Mapping[str, Any]) -> None:
    """Refuse a config.json written for another architecture, naming the models that fit it."""
    arch = hfc.architecture(config)
    model_type = config.get("model_type")
    if arch is not None:
        matches = arch == family.hf_architecture
        found = arch
    elif model_type is not None:
        matches = model_type == family.hf_model_type
        found = f"model_type {model_type!r}"
    else:
        raise EetuneError(
            "config.json has neither 'architectures' nor 'model_type'; restore the checkpoint's "
            "original config.json"
        )
    if matches:
        return
    from eetune.models.catalog import MODELS  # the table is built from this module's records

    fitting = [
        entry.name
        for entry in MODELS.values()
        if entry.family.hf_architecture == arch or entry.family.hf_model_type == model_type
    ]
    hint = f"use one of: {', '.join(fitting)}" if fitting else "eetune has no family for it"
    raise EetuneError(
        f"config.json describes a {found} model, but the {family.name} family expects "
        f"{family.hf_architecture}; {hint}"
    )


def _check_shapes(family: ModelFamily, config: Mapping[str, Any]) -> None:
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    kv_heads = hfc.num_kv_heads(config)
    if hidden % heads or heads % kv_heads:
        raise EetuneError(
            f"config.json has hidden_size={hidden}, num_attention_heads={heads}, "
            f"num_key_value_heads={kv_heads}: heads must divide hidden_size and kv heads must divide heads"
        )
    declared = config.get("head_dim")
    if declared is not None and int(declared) != hidden // heads:
        raise EetuneError(
            f"config.json has head_dim={declared} but hidden_size/num_attention_heads={hidden // heads}; "
            f"torchtune's {family.name} builder derives head_dim, so this checkpoint cannot be built"
        )
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise EetuneError(f"config.json has hidden_act={act!r}; the {family.name} family uses 'silu'")
    if config.get("mlp_bias", False):
        raise EetuneError(f"config.json sets mlp_bias=true; the {family.name} family has bias-free MLPs")
    if not family.qkv_bias and config.get("attention_bias", False):
        raise EetuneError(
            f"config.json sets attention_bias=true; the {family.name} family has bias-free attention"
        )


def param_count(family: ModelFamily, config: Mapping[str, Any]) -> int:
    """Parameters of the model ``config`` describes (tied heads counted once)."""
    vocab, dim = int(config["vocab_size"]), int(config["hidden_size"])
    heads, kv_heads = int(config["num_attention_heads"]), hfc.num_kv_heads(config)
    ffn = int(config["intermediate_size"])
    hd = dim // heads
    attn = dim * heads * hd * 2 + dim * kv_heads * hd * 2
    if family.qkv_bias:
        attn += heads * hd + 2 * kv_heads * hd
    layer = attn + 3 * dim * ffn + 2 * dim
    head = 0 if hfc.tie_word_embeddings(config) else vocab * dim
    return vocab * dim + hfc.num_layers(config) * layer + dim + head


