"""The table of model families and named models eetune knows (records: eetune.models.family).

A new Llama-like family is one ``ModelFamily`` here (its builder, its config.json -> kwargs
function, its HF and llama.cpp names, converters if not Llama's), its named sizes as
``ModelEntry`` rows, a ``configs/model/<name>.yaml`` and a test.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torchtune.models.llama2._component_builders import llama2 as _llama2_builder
from torchtune.models.llama3_1._component_builders import llama3_1 as _llama3_1_builder
from torchtune.models.llama3_2._component_builders import llama3_2 as _llama3_2_builder
from torchtune.models.mistral._component_builders import mistral as _mistral_builder
from torchtune.models.qwen2._component_builders import qwen2 as _qwen2_builder
from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune, qwen2_tune_to_hf

from eetune.errors import EetuneError
from eetune.models import hf_config as hfc
from eetune.models.family import (
    ModelEntry,
    ModelFamily,
    common_kwargs,
    llama3_scale_factor,
    require_plain_rope,
    require_untied,
)

# ---------------------------------------------------------------------------------------------
# config.json -> builder kwargs, per family


def _llama2_kwargs(config: Mapping[str, Any], max_seq_len: int) -> dict[str, Any]:
    require_plain_rope("llama2", config)
    require_untied("llama2", config, "llama3_2 (e.g. llama3_2_1b)")
    return {**common_kwargs(config, max_seq_len), "rope_base": hfc.rope_theta(config, 10_000.0)}


def _llama3_1_kwargs(config: Mapping[str, Any], max_seq_len: int) -> dict[str, Any]:
    require_untied("llama3_1", config, "llama3_2 (e.g. llama3_2_1b)")
    return {
        **common_kwargs(config, max_seq_len),
        "rope_base": hfc.rope_theta(config, 10_000.0),
        "scale_factor": llama3_scale_factor(config),
    }


def _llama3_2_kwargs(config: Mapping[str, Any], max_seq_len: int) -> dict[str, Any]:
    return {
        **common_kwargs(config, max_seq_len),
        "rope_base": hfc.rope_theta(config, 10_000.0),
        "scale_factor": llama3_scale_factor(config),
        "tie_word_embeddings": hfc.tie_word_embeddings(config),
    }


def _qwen2_kwargs(config: Mapping[str, Any], max_seq_len: int) -> dict[str, Any]:
    require_plain_rope("qwen2", config)
    if config.get("use_sliding_window", False):
        raise EetuneError(
            "config.json sets use_sliding_window=true, which torchtune's qwen2 builder does not "
            "implement; use a checkpoint with full attention"
        )
    return {
        **common_kwargs(config, max_seq_len),
        "rope_base": hfc.rope_theta(config, 10_000.0),
        "tie_word_embeddings": hfc.tie_word_embeddings(config),
    }


def _mistral_kwargs(config: Mapping[str, Any], max_seq_len: int) -> dict[str, Any]:
    require_plain_rope("mistral", config)
    require_untied("mistral", config, "llama3_2")
    window = config.get("sliding_window")
    # torchtune's mistral attends to the whole context; that equals sliding-window attention
    # only while sequences fit in the window.
    if window is not None and max_seq_len > int(window):
        raise EetuneError(
            f"max_seq_len={max_seq_len} exceeds this Mistral checkpoint's sliding_window={window}, "
            f"which torchtune's mistral builder does not implement; set model.max_seq_len<={window}"
        )
    return {**common_kwargs(config, max_seq_len), "rope_base": hfc.rope_theta(config, 10_000.0)}



def _qwen2_hf_to_tune(hf_tensors: Mapping[str, torch.Tensor], hf_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return qwen2_hf_to_tune(
        dict(hf_tensors), num_heads=int(hf_config["num_attention_heads"]), num_kv_heads=hfc.num_kv_heads(hf_config),
        dim=int(hf_config["hidden_size"]), tie_word_embeddings=hfc.tie_word_embeddings(hf_config),
    )


def _qwen2_tune_to_hf(state_dict: Mapping[str, torch.Tensor], hf_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return qwen2_tune_to_hf(
        dict(state_dict), num_heads=int(hf_config["num_attention_heads"]), num_kv_heads=hfc.num_kv_heads(hf_config),
        dim=int(hf_config["hidden_size"]), tie_word_embeddings=hfc.tie_word_embeddings(hf_config),
    )


# ---------------------------------------------------------------------------------------------
# the table


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
    hf_architecture="LlamaForCausalLM", hf_model_type="llama", qkv_bias=False, gguf_arch="llama",
    tiny_config=_tiny(architectures=["LlamaForCausalLM"], model_type="llama", num_key_value_heads=4,
                      rope_theta=10_000.0, tie_word_embeddings=False),
)
LLAMA3_1 = ModelFamily(
    name="llama3_1", builder=_llama3_1_builder, kwargs_fn=_llama3_1_kwargs, model_type="LLAMA3",
    hf_architecture="LlamaForCausalLM", hf_model_type="llama", qkv_bias=False, gguf_arch="llama",
    gguf_pre_tokenizer="llama-bpe",
    tiny_config=_tiny(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=500_000.0,
                      rope_scaling={**_LLAMA3_SCALING, "factor": 8.0}, tie_word_embeddings=False),
)
# LLAMA3 and LLAMA3_2 convert identically in FullModelHFCheckpointer; LLAMA3_2 names the family.
LLAMA3_2 = ModelFamily(
    name="llama3_2", builder=_llama3_2_builder, kwargs_fn=_llama3_2_kwargs, model_type="LLAMA3_2",
    hf_architecture="LlamaForCausalLM", hf_model_type="llama", qkv_bias=False, gguf_arch="llama",
    gguf_pre_tokenizer="llama-bpe",
    tiny_config=_tiny(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=500_000.0,
                      rope_scaling={**_LLAMA3_SCALING, "factor": 32.0}, tie_word_embeddings=True),
)
QWEN2 = ModelFamily(
    name="qwen2", builder=_qwen2_builder, kwargs_fn=_qwen2_kwargs, model_type="QWEN2",
    hf_architecture="Qwen2ForCausalLM", hf_model_type="qwen2", qkv_bias=True,
    hf_to_tune=_qwen2_hf_to_tune, tune_to_hf=_qwen2_tune_to_hf, gguf_arch="qwen2", gguf_pre_tokenizer="qwen2",
    tiny_config=_tiny(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1_000_000.0,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
                      sliding_window=None),
)
MISTRAL = ModelFamily(
    name="mistral", builder=_mistral_builder, kwargs_fn=_mistral_kwargs, model_type="MISTRAL",
    # llama.cpp runs Mistral as llama.
    hf_architecture="MistralForCausalLM", hf_model_type="mistral", qkv_bias=False, gguf_arch="llama",
    tiny_config=_tiny(architectures=["MistralForCausalLM"], model_type="mistral", rope_theta=10_000.0,
                      tie_word_embeddings=False, sliding_window=None),
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (LLAMA2, LLAMA3_1, LLAMA3_2, QWEN2, MISTRAL)}


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
            num_attention_heads=9, num_key_value_heads=3), gguf_pre_tokenizer="smollm"),
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


MODELS: dict[str, ModelEntry] = {entry.name: entry for entry in _entries()}


