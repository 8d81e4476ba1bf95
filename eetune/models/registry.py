"""Model families and named models.

A ``ModelFamily`` is one torchtune component builder plus what is needed to read a Hugging Face
checkpoint of that architecture: how ``config.json`` maps to builder kwargs (with the checks
that the builder really implements what the config asks for), the ``FullModelHFCheckpointer``
model_type, the HF class name, and a tiny config for tests. A ``ModelEntry`` is a named, real
size of a family with its reference ``config.json`` values, so code can plan (memory, exit
positions) without the checkpoint. The architecture of a loaded model always comes from the
checkpoint's own ``config.json``: any size of a family loads under any of its names.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torchtune.models.llama2._component_builders import llama2 as _llama2_builder
from torchtune.models.llama3_1._component_builders import llama3_1 as _llama3_1_builder
from torchtune.models.llama3_2._component_builders import llama3_2 as _llama3_2_builder
from torchtune.models.mistral._component_builders import mistral as _mistral_builder
from torchtune.models.qwen2._component_builders import qwen2 as _qwen2_builder
from torchtune.modules import TransformerDecoder

from eetune.errors import EetuneError
from eetune.models import hf_config as hfc

DEFAULT_MODEL = "smollm2_135m"

# torchtune's Llama3ScaledRoPE hard-codes these; a config asking for others would silently differ.
_LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

KwargsFn = Callable[[Mapping[str, Any], int], dict[str, Any]]


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

    @property
    def num_layers(self) -> int:
        return hfc.num_layers(self.reference_config)

    @property
    def num_params(self) -> int:
        return param_count(self.family, self.reference_config)


# ---------------------------------------------------------------------------------------------
# config.json -> builder kwargs


def _common_kwargs(config: Mapping[str, Any], max_seq_len: int) -> dict[str, Any]:
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


def _require_plain_rope(family: str, config: Mapping[str, Any]) -> None:
    scaling = hfc.rope_scaling(config)
    if scaling is not None:
        raise EetuneError(
            f"config.json asks for RoPE scaling {scaling['rope_type']!r}, which torchtune's {family} "
            "builder does not implement; use a checkpoint without rope_scaling or a family that has it"
        )


def _require_untied(family: str, config: Mapping[str, Any], tied_alternative: str) -> None:
    if hfc.tie_word_embeddings(config):
        raise EetuneError(
            f"config.json sets tie_word_embeddings=true, which torchtune's {family} builder does not "
            f"support; load this checkpoint with a {tied_alternative} model name"
        )


def _llama3_scale_factor(config: Mapping[str, Any]) -> float:
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


def _llama2_kwargs(config: Mapping[str, Any], max_seq_len: int) -> dict[str, Any]:
    _require_plain_rope("llama2", config)
    _require_untied("llama2", config, "llama3_2 (e.g. llama3_2_1b)")
    return {**_common_kwargs(config, max_seq_len), "rope_base": hfc.rope_theta(config, 10_000.0)}


def _llama3_1_kwargs(config: Mapping[str, Any], max_seq_len: int) -> dict[str, Any]:
    _require_untied("llama3_1", config, "llama3_2 (e.g. llama3_2_1b)")
    return {
        **_common_kwargs(config, max_seq_len),
        "rope_base": hfc.rope_theta(config, 10_000.0),
        "scale_factor": _llama3_scale_factor(config),
    }


def _llama3_2_kwargs(config: Mapping[str, Any], max_seq_len: int) -> dict[str, Any]:
    return {
        **_common_kwargs(config, max_seq_len),
        "rope_base": hfc.rope_theta(config, 10_000.0),
        "scale_factor": _llama3_scale_factor(config),
        "tie_word_embeddings": hfc.tie_word_embeddings(config),
    }


def _qwen2_kwargs(config: Mapping[str, Any], max_seq_len: int) -> dict[str, Any]:
    _require_plain_rope("qwen2", config)
    if config.get("use_sliding_window", False):
        raise EetuneError(
            "config.json sets use_sliding_window=true, which torchtune's qwen2 builder does not "
            "implement; use a checkpoint with full attention"
        )
    return {
        **_common_kwargs(config, max_seq_len),
        "rope_base": hfc.rope_theta(config, 10_000.0),
        "tie_word_embeddings": hfc.tie_word_embeddings(config),
    }


def _mistral_kwargs(config: Mapping[str, Any], max_seq_len: int) -> dict[str, Any]:
    _require_plain_rope("mistral", config)
    _require_untied("mistral", config, "llama3_2")
    window = config.get("sliding_window")
    # torchtune's mistral attends to the whole context; that equals sliding-window attention
    # only while sequences fit in the window.
    if window is not None and max_seq_len > int(window):
        raise EetuneError(
            f"max_seq_len={max_seq_len} exceeds this Mistral checkpoint's sliding_window={window}, "
            f"which torchtune's mistral builder does not implement; set model.max_seq_len<={window}"
        )
    return {**_common_kwargs(config, max_seq_len), "rope_base": hfc.rope_theta(config, 10_000.0)}


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
    fitting = [
        entry.name
        for entry in _MODELS.values()
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


# ---------------------------------------------------------------------------------------------
# the registry


def _frozen(**values: Any) -> Mapping[str, Any]:
    return MappingProxyType(values)


def _tiny(**values: Any) -> Mapping[str, Any]:
    """A tiny config.json: 2 layers, dim 64, 4 heads, vocab 256; each family sets its quirks."""
    base: dict[str, Any] = {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 16384,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    base.update(values)
    return MappingProxyType(base)


_LLAMA3_SCALING = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}

LLAMA2 = ModelFamily(
    name="llama2", builder=_llama2_builder, kwargs_fn=_llama2_kwargs, model_type="LLAMA2",
    hf_architecture="LlamaForCausalLM", hf_model_type="llama", qkv_bias=False,
    tiny_config=_tiny(architectures=["LlamaForCausalLM"], model_type="llama", num_key_value_heads=4,
                      rope_theta=10_000.0, tie_word_embeddings=False),
)
LLAMA3_1 = ModelFamily(
    name="llama3_1", builder=_llama3_1_builder, kwargs_fn=_llama3_1_kwargs, model_type="LLAMA3",
    hf_architecture="LlamaForCausalLM", hf_model_type="llama", qkv_bias=False,
    tiny_config=_tiny(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=500_000.0,
                      rope_scaling={**_LLAMA3_SCALING, "factor": 8.0}, tie_word_embeddings=False),
)
# LLAMA3 and LLAMA3_2 convert identically in FullModelHFCheckpointer; LLAMA3_2 names the family.
LLAMA3_2 = ModelFamily(
    name="llama3_2", builder=_llama3_2_builder, kwargs_fn=_llama3_2_kwargs, model_type="LLAMA3_2",
    hf_architecture="LlamaForCausalLM", hf_model_type="llama", qkv_bias=False,
    tiny_config=_tiny(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=500_000.0,
                      rope_scaling={**_LLAMA3_SCALING, "factor": 32.0}, tie_word_embeddings=True),
)
QWEN2 = ModelFamily(
    name="qwen2", builder=_qwen2_builder, kwargs_fn=_qwen2_kwargs, model_type="QWEN2",
    hf_architecture="Qwen2ForCausalLM", hf_model_type="qwen2", qkv_bias=True,
    tiny_config=_tiny(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1_000_000.0,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
                      sliding_window=None),
)
MISTRAL = ModelFamily(
    name="mistral", builder=_mistral_builder, kwargs_fn=_mistral_kwargs, model_type="MISTRAL",
    hf_architecture="MistralForCausalLM", hf_model_type="mistral", qkv_bias=False,
    tiny_config=_tiny(architectures=["MistralForCausalLM"], model_type="mistral", rope_theta=10_000.0,
                      tie_word_embeddings=False, sliding_window=None),
)

_FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (LLAMA2, LLAMA3_1, LLAMA3_2, QWEN2, MISTRAL)}


def _llama(arch_values: dict[str, Any], **values: Any) -> Mapping[str, Any]:
    return _frozen(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                   **arch_values, **values)


_LLAMA2_BASE = {"vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 10_000.0,
                "max_position_embeddings": 4096, "tie_word_embeddings": False,
                "bos_token_id": 1, "eos_token_id": 2}
_LLAMA3_BASE = {"vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500_000.0,
                "max_position_embeddings": 131072, "bos_token_id": 128000, "eos_token_id": 128001}
_QWEN25_BASE = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "use_sliding_window": False,
                "bos_token_id": 151643, "eos_token_id": 151643}


def _entries() -> list[ModelEntry]:
    return [
        ModelEntry("smollm2_135m", LLAMA3_2, "HuggingFaceTB/SmolLM2-135M-Instruct", _llama(
            {"vocab_size": 49152, "rms_norm_eps": 1e-5, "rope_theta": 100_000.0,
             "max_position_embeddings": 8192, "tie_word_embeddings": True,
             "bos_token_id": 1, "eos_token_id": 2},
            hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3)),
        ModelEntry("llama2_7b", LLAMA2, "meta-llama/Llama-2-7b-hf", _llama(
            _LLAMA2_BASE, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32)),
        ModelEntry("llama2_13b", LLAMA2, "meta-llama/Llama-2-13b-hf", _llama(
            _LLAMA2_BASE, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
            num_attention_heads=40, num_key_value_heads=40)),
        ModelEntry("llama2_70b", LLAMA2, "meta-llama/Llama-2-70b-hf", _llama(
            _LLAMA2_BASE, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
            num_attention_heads=64, num_key_value_heads=8)),
        ModelEntry("llama3_1_8b", LLAMA3_1, "meta-llama/Llama-3.1-8B", _llama(
            {**_LLAMA3_BASE, "tie_word_embeddings": False,
             "rope_scaling": {**_LLAMA3_SCALING, "factor": 8.0}},
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8)),
        ModelEntry("llama3_1_70b", LLAMA3_1, "meta-llama/Llama-3.1-70B", _llama(
            {**_LLAMA3_BASE, "tie_word_embeddings": False,
             "rope_scaling": {**_LLAMA3_SCALING, "factor": 8.0}},
            hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
            num_attention_heads=64, num_key_value_heads=8)),
        ModelEntry("llama3_2_1b", LLAMA3_2, "meta-llama/Llama-3.2-1B", _llama(
            {**_LLAMA3_BASE, "tie_word_embeddings": True,
             "rope_scaling": {**_LLAMA3_SCALING, "factor": 32.0}},
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, head_dim=64)),
        ModelEntry("llama3_2_3b", LLAMA3_2, "meta-llama/Llama-3.2-3B", _llama(
            {**_LLAMA3_BASE, "tie_word_embeddings": True,
             "rope_scaling": {**_LLAMA3_SCALING, "factor": 32.0}},
            hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
            num_attention_heads=24, num_key_value_heads=8, head_dim=128)),
        ModelEntry("qwen2_5_0_5b", QWEN2, "Qwen/Qwen2.5-0.5B", _frozen(
            **_QWEN25_BASE, vocab_size=151936, hidden_size=896, intermediate_size=4864,
            num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
            max_position_embeddings=32768, tie_word_embeddings=True)),
        ModelEntry("qwen2_5_1_5b", QWEN2, "Qwen/Qwen2.5-1.5B", _frozen(
            **_QWEN25_BASE, vocab_size=151936, hidden_size=1536, intermediate_size=8960,
            num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
            max_position_embeddings=131072, tie_word_embeddings=True)),
        ModelEntry("qwen2_5_3b", QWEN2, "Qwen/Qwen2.5-3B", _frozen(
            **_QWEN25_BASE, vocab_size=151936, hidden_size=2048, intermediate_size=11008,
            num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
            max_position_embeddings=32768, tie_word_embeddings=True)),
        ModelEntry("qwen2_5_7b", QWEN2, "Qwen/Qwen2.5-7B", _frozen(
            **_QWEN25_BASE, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
            num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
            max_position_embeddings=131072, tie_word_embeddings=False)),
        ModelEntry("mistral_7b", MISTRAL, "mistralai/Mistral-7B-v0.1", _frozen(
            architectures=["MistralForCausalLM"], model_type="mistral", hidden_act="silu",
            vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10_000.0,
            max_position_embeddings=32768, sliding_window=4096, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)),
    ]


_MODELS: dict[str, ModelEntry] = {entry.name: entry for entry in _entries()}


def _normalise(name: str) -> str:
    # Accept the spellings people type from HF repo names: "SmolLM2-135M", "qwen2.5-0.5b".
    return name.strip().lower().replace("-", "_").replace(".", "_")


def list_models() -> list[str]:
    return list(_MODELS)


def list_families() -> list[str]:
    return list(_FAMILIES)


def get_model_entry(name: str) -> ModelEntry:
    """The registered model ``name``; an unknown name lists close matches and all names."""
    entry = _MODELS.get(_normalise(name))
    if entry is not None:
        return entry
    close = difflib.get_close_matches(_normalise(name), list(_MODELS), n=3, cutoff=0.5)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise EetuneError(f"unknown model {name!r}{hint}; available models: {', '.join(_MODELS)}")


def get_family(name: str) -> ModelFamily:
    family = _FAMILIES.get(_normalise(name))
    if family is None:
        raise EetuneError(f"unknown model family {name!r}; available families: {', '.join(_FAMILIES)}")
    return family


def resolve_family(entry_or_family: ModelEntry | ModelFamily | str) -> ModelFamily:
    """A family from an entry, a family, a family name or a model name."""
    if isinstance(entry_or_family, ModelFamily):
        return entry_or_family
    if isinstance(entry_or_family, ModelEntry):
        return entry_or_family.family
    family = _FAMILIES.get(_normalise(entry_or_family))
    return family if family is not None else get_model_entry(entry_or_family).family


def build_decoder(
    entry_or_family: ModelEntry | ModelFamily | str, hf_config: Mapping[str, Any], max_seq_len: int
) -> TransformerDecoder:
    """A randomly initialised torchtune decoder shaped by ``hf_config`` (a config.json dict)."""
    return resolve_family(entry_or_family).build(hf_config, max_seq_len)
