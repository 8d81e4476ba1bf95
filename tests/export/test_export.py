"""`eetune export`: draft models that transformers (HF dir, GGUF) runs exactly like our exits,
assisted generation with them, and base + exits bundles that eetune loads back alone."""

from __future__ import annotations

import filecmp
import io
import json
import math
import os
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from eetune.config import compose_config
from eetune.errors import EetuneError
from eetune.exits import EarlyExitModel, ExitSpec, build_manifest, load_exits, read_manifest, save_exits
from eetune.export import build_draft, load_exported, save_draft, save_draft_gguf
from eetune.export.lazy import write_safetensors
from eetune.models import BaseModel, get_model_entry, load_base_model
from eetune.models.tiny import write_tiny_checkpoint
from eetune.parallel.load import CheckpointTensors
from eetune.stages import export as stage
from eetune.stages import generate
from eetune.models import base_info

ARCHS = ("norm", "mlp", "layer")


def make_run(run_dir: Path, base: BaseModel, specs: list[ExitSpec], seed: int = 0) -> Path:
    """A run dir whose exits look tuned: every exit weight moved off its initial value, so a
    draft that used the backbone's norm, MLP or head instead of the exit's would not match."""
    torch.manual_seed(seed)
    model = EarlyExitModel(base.model, specs)
    with torch.no_grad():
        for param in model.exits.parameters():
            param.add_(0.05 * torch.randn_like(param) * (param.abs().mean() + 0.1))
    save_exits(run_dir, model, build_manifest(model, base_info(base), stage="tune"))
    return run_dir


def export(fmt: str, run_dir: Path, out: Path, *overrides: str):
    cfg = compose_config(
        "export", [f"export.format={fmt}", f"export.run_dir={run_dir}", f"export.out={out}", *overrides]
    )
    return stage.run(cfg)


def exit_logits(run_dir: Path, base: BaseModel, layer: int, tokens: torch.Tensor) -> torch.Tensor:
    return load_exits(run_dir, base.model, base.fingerprint)(tokens, exits=[layer])[layer]


def hf_logits(path: Path, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs)
    with torch.no_grad():
        return model(tokens).logits


def other_weights(path: Path) -> Path:
    """A checkpoint shaped exactly like the tiny base model, with other weights."""
    return write_tiny_checkpoint(get_model_entry("smollm2_135m"), path, seed=1, num_hidden_layers=4,
                                 rope_theta=100_000.0, rope_scaling=None, tie_word_embeddings=True,
                                 max_position_embeddings=2048)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(3, 256, (2, 19), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def no_base_loading(monkeypatch):
    """Fails the test if anything loads a whole base model (`load_base_model` reads every tensor
    through `load_tune_state_dict`): exports read the checkpoint one tensor at a time."""

    def refuse(*args, **kwargs):
        raise AssertionError("the export loaded the whole base model")

    monkeypatch.setattr("eetune.models.load.load_tune_state_dict", refuse)


@pytest.fixture(scope="module")
def mixed_run(tiny_base_model, tmp_path_factory) -> Path:
    """One exit of each draftable architecture, with both kinds of head and init."""
    specs = [ExitSpec(1, "norm", "random", "copy"), ExitSpec(2, "mlp", "copy", "shared"), ExitSpec(3, "layer", "copy", "copy")]
    return make_run(tmp_path_factory.mktemp("mixed") / "run", tiny_base_model, specs)


# --- draft: a standard HF causal LM -------------------------------------------------------------


@pytest.fixture(scope="module", params=[("copy", "shared"), ("copy", "copy"), ("random", "shared"), ("random", "copy")],
                ids="-".join)
def tiny_run(request, tiny_base_model, tmp_path_factory) -> Path:
    """Exits of every draftable architecture on the tiny model: norm at 1, mlp at 2, layer at 3."""
    init, head = request.param
    specs = [ExitSpec(layer, arch, init, head) for layer, arch in zip((1, 2, 3), ARCHS)]
    return make_run(tmp_path_factory.mktemp("run") / "run", tiny_base_model, specs)


@pytest.mark.parametrize("layer, arch", list(zip((1, 2, 3), ARCHS)))
def test_draft_dir_is_a_plain_llama_whose_logits_equal_the_exits(
    tiny_run, tiny_base_model, tokens, tmp_path, no_base_loading, layer, arch
):
    out = tmp_path / "draft"
    result = export("draft", tiny_run, out, f"export.exit={layer}")
    spec = read_manifest(tiny_run)["exits"][layer - 1]

    config = json.loads((out / "config.json").read_text())
    extra = arch in ("mlp", "layer")  # one more decoder layer for the exit's block
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert config["num_hidden_layers"] == result.num_layers == layer + extra
    weights = load_file(str(out / "model.safetensors"))
    assert config["tie_word_embeddings"] == (spec["head"] == "shared")  # the tiny base is tied
    assert ("lm_head.weight" in weights) == (spec["head"] == "copy")
    assert not list(out.glob("*.py"))  # no custom code anywhere
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}
    assert (out / "tokenizer.json").read_bytes() == (tiny_base_model.checkpoint_dir / "tokenizer.json").read_bytes()
    if arch == "mlp":  # an attention half that adds nothing
        assert not weights[f"model.layers.{layer}.self_attn.o_proj.weight"].any()

    expected = exit_logits(tiny_run, tiny_base_model, layer, tokens)
    torch.testing.assert_close(hf_logits(out, tokens), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "model_name, arch",
    [("llama2_7b", "mlp"), ("llama3_1_8b", "layer"), ("qwen2_5_0_5b", "mlp"), ("mistral_7b", "norm")],
)
def test_draft_of_other_families_matches_the_exit(tmp_path, tokens, model_name, arch):
    """Untied heads (llama2, mistral), Llama 3 RoPE scaling, Qwen2's q/k/v biases."""
    entry = get_model_entry(model_name)
    checkpoint = write_tiny_checkpoint(entry, tmp_path / "base", seed=1, num_hidden_layers=3)
    base = load_base_model(model_name, checkpoint_dir=checkpoint)
    run_dir = make_run(tmp_path / "run", base, [ExitSpec(2, arch, "copy", "shared")])
    out = tmp_path / "draft"
    export("draft", run_dir, out, "export.exit=2")

    assert json.loads((out / "config.json").read_text())["architectures"] == [entry.family.hf_architecture]
    torch.testing.assert_close(hf_logits(out, tokens), exit_logits(run_dir, base, 2, tokens), rtol=0, atol=1e-4)


def test_smollm2_draft_matches_the_exit_and_assists_generation_losslessly(smollm2, smollm2_dir, tmp_path, no_base_loading):
    run_dir = make_run(tmp_path / "run", smollm2, [ExitSpec(8, "mlp", "copy", "shared"), ExitSpec(20, "mlp", "copy", "shared")])
    out = tmp_path / "draft20"
    export("draft", run_dir, out, "export.exit=20")
    tokenizer = smollm2.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    prompt = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])

    draft = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(draft(prompt).logits, exit_logits(run_dir, smollm2, 20, prompt), rtol=0, atol=1e-4)

    target = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    drafted = count_calls(draft)
    settings = {"max_new_tokens": 12, "do_sample": False}
    plain = target.generate(prompt, **settings)
    assisted = target.generate(prompt, assistant_model=draft, **settings)
    assert drafted() > 0  # the draft really proposed tokens
    assert torch.equal(assisted, plain)
    assert tokenizer.decode(plain[0, prompt.shape[1]:], skip_special_tokens=True).startswith("The capital of France is Paris")


def count_calls(module: torch.nn.Module):
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return lambda: calls[0]


def test_tiny_draft_as_assistant_model_gives_the_base_models_greedy_output(tiny_base_model, tmp_path, no_base_loading):
    # A random exit drafts badly, so transformers must reject and roll back again and again.
    run_dir = make_run(tmp_path / "run", tiny_base_model, [ExitSpec(1, "layer", "random", "copy")])
    out = tmp_path / "draft"
    export("draft", run_dir, out, "export.exit=1")
    target = AutoModelForCausalLM.from_pretrained(str(tiny_base_model.checkpoint_dir), dtype=torch.float32)
    draft = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    drafted = count_calls(draft)
    prompt = torch.tensor([tiny_base_model.tokenizer.encode("Once upon a time")])
    plain = target.generate(prompt, max_new_tokens=20, do_sample=False)
    assert torch.equal(target.generate(prompt, assistant_model=draft, max_new_tokens=20, do_sample=False), plain)
    assert drafted() > 0


def test_a_failed_draft_export_leaves_nothing_behind(mixed_run, tmp_path, monkeypatch, no_base_loading):
    def full_disk(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("eetune.export.draft.write_safetensors", full_disk)
    with pytest.raises(OSError, match="disk full"):
        export("draft", mixed_run, tmp_path / "draft", "export.exit=2")
    assert list(tmp_path.iterdir()) == []


def test_a_draft_over_the_shard_size_is_written_as_hugging_face_shards(mixed_run, tiny_base_model, tokens, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr("eetune.export.draft.write_safetensors", partial(write_safetensors, max_shard_bytes=64 << 10))
    out = tmp_path / "draft"
    export("draft", mixed_run, out, "export.exit=3")
    files = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(files) > 2 and files == {p.name for p in out.glob("*.safetensors")}
    torch.testing.assert_close(hf_logits(out, tokens), exit_logits(mixed_run, tiny_base_model, 3, tokens), rtol=0, atol=1e-4)


def test_bfloat16_draft_is_the_float32_draft_rounded(mixed_run, tmp_path):
    # Read for real in each dtype: the stage casts each tensor as it writes it.
    export("draft", mixed_run, tmp_path / "fp32", "export.exit=2")
    export("draft", mixed_run, tmp_path / "bf16", "export.exit=2", "export.dtype=bfloat16")
    full, half = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("fp32", "bf16"))
    assert full.keys() == half.keys()
    for name in full:
        assert half[name].dtype == torch.bfloat16 and torch.equal(half[name], full[name].to(torch.bfloat16))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


# --- gguf: the draft for llama.cpp ---------------------------------------------------------------


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_gguf_draft_loads_in_transformers_with_the_exits_logits(
    mixed_run, tiny_base_model, tokens, tmp_path, no_base_loading, layer
):
    import gguf

    expected = exit_logits(mixed_run, tiny_base_model, layer, tokens)
    for dtype in ("float32", "float16"):
        out = tmp_path / f"draft-{dtype}.gguf"
        export("gguf", mixed_run, out, f"export.exit={layer}", f"export.dtype={dtype}")
        got = hf_logits(tmp_path, tokens, gguf_file=out.name)
        if dtype == "float32":
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        else:  # weights rounded to float16: errors of float16's relative precision
            assert (got - expected).abs().max() < 1e-3 * expected.abs().max()
            types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
            assert types["token_embd.weight"] == "F16" and types["output_norm.weight"] == "F32"


@pytest.mark.parametrize("model_name", ["llama2_7b", "qwen2_5_0_5b", "mistral_7b"])
def test_gguf_draft_of_other_families_matches_the_exit(tmp_path, tokens, model_name):
    """llama.cpp permutes q/k rows of Llama and Mistral but not of Qwen2 (whose biases it keeps)."""
    checkpoint = write_tiny_checkpoint(get_model_entry(model_name), tmp_path / "base", seed=2, num_hidden_layers=3)
    base = load_base_model(model_name, checkpoint_dir=checkpoint)
    run_dir = make_run(tmp_path / "run", base, [ExitSpec(2, "layer", "copy", "shared")])
    out = tmp_path / "draft.gguf"
    export("gguf", run_dir, out, "export.exit=2")
    got = hf_logits(tmp_path, tokens, gguf_file=out.name)
    torch.testing.assert_close(got, exit_logits(run_dir, base, 2, tokens), rtol=0, atol=1e-4)


def test_smollm2_gguf_draft_carries_a_tokenizer_transformers_rebuilds_exactly(smollm2, tmp_path, no_base_loading):
    # Logits through GGUF are checked on the tiny models above (same llama layout, GQA included);
    # here the real 49k-token BPE vocabulary, its merges, specials and chat template. (Reading
    # them back is slow: gguf's reader parses metadata arrays in Python.)
    run_dir = make_run(tmp_path / "run", smollm2, [ExitSpec(2, "norm", "copy", "shared")])
    out = tmp_path / "draft2.gguf"
    export("gguf", run_dir, out, "export.exit=2", "export.dtype=float16")

    original = smollm2.tokenizer
    converted = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    text = original.apply_chat_template(
        [{"role": "user", "content": "Naïve café owners say: `x = 1_000`!\n\tOK?  Sure..."}],
        tokenize=False, add_generation_prompt=True,
    )
    assert converted.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False)
    assert converted.chat_template == original.chat_template
    assert (converted.bos_token_id, converted.eos_token_id) == (1, 2)


def test_gguf_llama3_rope_scaling_is_written_as_llama_cpp_rope_freqs(tmp_path):
    import gguf

    checkpoint = write_tiny_checkpoint(get_model_entry("llama3_1_8b"), tmp_path / "base", seed=3, num_hidden_layers=3)
    base = load_base_model("llama3_1_8b", checkpoint_dir=checkpoint)
    run_dir = make_run(tmp_path / "run", base, [ExitSpec(2, "norm", "copy", "shared")])
    out = tmp_path / "draft.gguf"
    export("gguf", run_dir, out, "export.exit=2")
    factors = next(t for t in gguf.GGUFReader(str(out)).tensors if t.name == "rope_freqs.weight").data

    # llama.cpp's convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors, written out independently.
    config = base.hf_config
    scaling, dim = config["rope_scaling"], config["hidden_size"] // config["num_attention_heads"]
    low, high, old = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["original_max_position_embeddings"]
    expected = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * config["rope_theta"] ** (i / dim)
        if wavelen < old / high:
            expected.append(1.0)
        elif wavelen > old / low:
            expected.append(scaling["factor"])
        else:
            smooth = (old / wavelen - low) / (high - low)
            expected.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    np.testing.assert_allclose(factors, expected, rtol=1e-5)
    assert len(set(np.round(factors, 4))) > 2  # the tiny head_dim covers all three bands


# --- draft and gguf stream the base: a base bigger than any machine's memory exports too --------


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_streamed_draft_and_gguf_hold_the_tensors_of_the_draft_built_in_memory(
    mixed_run, tiny_base_model, tmp_path, no_base_loading, layer
):
    import gguf

    base = tiny_base_model
    loaded = build_draft(load_exits(mixed_run, base.model, base.fingerprint), layer, base.hf_config)
    save_draft(loaded, base.family, base.checkpoint_dir, tmp_path / "loaded", torch.bfloat16, {})
    save_draft_gguf(loaded, base.family, base.name, base.checkpoint_dir, tmp_path / "loaded.gguf", torch.float16, "t")
    export("draft", mixed_run, tmp_path / "streamed", f"export.exit={layer}", "export.dtype=bfloat16")
    export("gguf", mixed_run, tmp_path / "streamed.gguf", f"export.exit={layer}", "export.dtype=float16")

    # Compared by tensor: safetensors files list their tensors in hash order.
    streamed, expected = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("streamed", "loaded"))
    assert streamed.keys() == expected.keys()
    assert all(streamed[k].dtype == expected[k].dtype and torch.equal(streamed[k], expected[k]) for k in expected)
    streamed, expected = (gguf.GGUFReader(str(tmp_path / f)).tensors for f in ("streamed.gguf", "loaded.gguf"))
    assert [(t.name, t.tensor_type) for t in streamed] == [(t.name, t.tensor_type) for t in expected]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(streamed, expected))


def test_streamed_draft_and_gguf_refuse_other_weights_and_write_nothing(mixed_run, tmp_path, no_base_loading):
    other = other_weights(tmp_path / "other")
    for fmt, out in (("draft", tmp_path / "draft"), ("gguf", tmp_path / "draft.gguf")):
        with pytest.raises(EetuneError, match=f"but the base model loaded from {other} has fingerprint"):
            export(fmt, mixed_run, out, "export.exit=2", f"model.checkpoint_dir={other}")
    assert [p.name for p in tmp_path.iterdir()] == ["other"]


@pytest.mark.parametrize("fmt, layer", [("draft", 2), ("gguf", 3)])
def test_a_draft_reads_only_the_base_tensors_it_keeps(mixed_run, tiny_base_model, tmp_path, monkeypatch, fmt, layer):
    """Past the fingerprint (which samples every tensor), only the embeddings and the layers below
    the exit are read, none deeper: the exit's own weights, copies included, are in exits.safetensors."""
    read: list[str] = []
    fingerprinting = [False]
    get, fingerprint = CheckpointTensors.__getitem__, stage.fingerprint

    def recording_get(self, name):
        if not fingerprinting[0]:
            read.append(name)
        return get(self, name)

    def flagged_fingerprint(tensors):
        fingerprinting[0] = True
        try:
            return fingerprint(tensors)
        finally:
            fingerprinting[0] = False

    monkeypatch.setattr(CheckpointTensors, "__getitem__", recording_get)
    monkeypatch.setattr(stage, "fingerprint", flagged_fingerprint)
    out = tmp_path / ("draft.gguf" if fmt == "gguf" else "draft")
    export(fmt, mixed_run, out, f"export.exit={layer}")
    names = tiny_base_model.model.state_dict().keys()
    kept = {n for n in names if n == "tok_embeddings.weight" or n.startswith(tuple(f"layers.{i}." for i in range(layer)))}
    assert set(read) == kept  # the tied embeddings are the head of the shared-head mlp exit at 2
    assert len(read) == len(kept) + (layer == 2) * sum(n.startswith("layers.0.") for n in names)  # mlp: layer 0 once more


# --- hf: base + all exits in one dir ------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tiny_base_model, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bundle")
    specs = [ExitSpec(1, "norm", "random", "copy", "linear"), ExitSpec(2, "mlp"), ExitSpec(3, "layer", head="copy")]
    run_dir = make_run(root / "run", tiny_base_model, specs)
    export("hf", run_dir, root / "export")
    return run_dir, root / "export"


def test_hf_export_keeps_the_base_checkpoint_untouched_beside_the_exits(bundle, tiny_base_model, tokens):
    run_dir, out = bundle
    source = tiny_base_model.checkpoint_dir
    assert filecmp.cmp(source / "model.safetensors", out / "model.safetensors", shallow=False)
    assert filecmp.cmp(source / "tokenizer.json", out / "tokenizer.json", shallow=False)
    config = json.loads((out / "config.json").read_text())
    base_config = json.loads((source / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "eetune"} == base_config
    assert [e["layer"] for e in config["eetune"]["exits"]] == [1, 2, 3]
    assert config["eetune"]["base_model"]["fingerprint"] == tiny_base_model.fingerprint

    exported = load_file(str(out / "exits.safetensors"))
    original = load_file(str(run_dir / "exits.safetensors"))
    assert exported.keys() == {f"exits.{name}" for name in original}
    assert all(torch.equal(exported[f"exits.{name}"], tensor) for name, tensor in original.items())
    # To transformers it is still the base model.
    torch.testing.assert_close(hf_logits(out, tokens), tiny_base_model.model(tokens), rtol=0, atol=1e-4)


def test_hf_export_never_loads_the_base_and_refuses_other_weights(bundle, tiny_base_model, tmp_path, no_base_loading):
    """The bundle is copied files: the base is only fingerprinted, one tensor at a time, so a base
    that fits no single device exports too; other weights than the exits' are refused."""
    run_dir, first = bundle
    export("hf", run_dir, tmp_path / "again")
    # Same tensors and metadata; not the same bytes: safetensors writes its metadata map in hash order.
    again, before = (safe_open(str(d / "exits.safetensors"), "pt") for d in (tmp_path / "again", first))
    assert again.metadata() == before.metadata()
    assert again.keys() == before.keys()
    assert all(torch.equal(again.get_tensor(name), before.get_tensor(name)) for name in before.keys())
    other = other_weights(tmp_path / "other")
    with pytest.raises(EetuneError, match=f"but the base model loaded from {other} has fingerprint"):
        export("hf", run_dir, tmp_path / "refused", f"model.checkpoint_dir={other}")
    assert not (tmp_path / "refused").exists()


def test_hf_export_loads_back_without_the_run_dir(bundle, tiny_base_model, tokens, tmp_path):
    run_dir, out = bundle
    moved = tmp_path / "moved"
    out.rename(moved)  # nothing may point back at the run dir or the old location
    try:
        base, model = load_exported(moved)
        assert base.fingerprint == tiny_base_model.fingerprint and base.checkpoint_dir == moved
        original = load_exits(run_dir, tiny_base_model.model, tiny_base_model.fingerprint)
        assert model.specs == original.specs
        reloaded = model.exits.state_dict()
        assert all(torch.equal(reloaded[k], v) for k, v in original.exits.state_dict().items())
        for layer, logits in original(tokens, include_final=True).items():
            assert torch.equal(model(tokens, include_final=True)[layer], logits)

        # eetune generate reads it both as the base checkpoint and as the run dir.
        def gen(mode: str) -> list[int]:
            cfg = compose_config("generate", [
                f"model.checkpoint_dir={moved}", f"generate.run_dir={moved}", f"generate.mode={mode}",
                "generate.prompt=Hello", "generate.max_new_tokens=8", "generate.draft_exit=2",
            ])
            return generate.run(cfg, out=io.StringIO()).result.tokens

        assert gen("self_speculative") == gen("full")

        # ... and a draft exported from it equals one exported from the run dir.
        export("draft", moved, tmp_path / "from_export", "export.exit=2")
        export("draft", run_dir, tmp_path / "from_run", "export.exit=2")
        a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("from_export", "from_run"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    finally:
        moved.rename(out)


def test_load_exported_refuses_a_plain_run_dir(bundle):
    run_dir, _ = bundle
    with pytest.raises(EetuneError, match="not an `eetune export hf` dir"):
        load_exported(run_dir)


# --- bad input: one line, exit code 2 ------------------------------------------------------------


@pytest.fixture(scope="module")
def embedding_run(tiny_base_model, tmp_path_factory) -> Path:
    specs = [ExitSpec(1, "embedding", "copy", "copy"), ExitSpec(2, "mlp")]
    return make_run(tmp_path_factory.mktemp("emb") / "run", tiny_base_model, specs)


@pytest.mark.parametrize(
    "command, args, message",
    [
        ("draft", ["exit=3"], "has no exit at layer 3; its exits are at [1, 2]"),
        ("draft", ["exit=1"], "'embedding' exit"),
        ("draft", [], "needs the drafting exit: pass exit=L, one of [1, 2]"),
        ("gguf", ["exit=2", "dtype=bfloat16"], "GGUF export writes float32 or float16"),
        ("draft", ["exit=2", "OUT_EXISTS"], "already exists"),
        ("hf", ["run_dir=/no/such/run"], "run dir not found: /no/such/run"),
        ("hf", ["NOT_A_RUN"], "has no manifest.json"),
        ("gguf", ["exit=2", "out=draft.bin"], "must be a file name ending in .gguf"),
        ("draft", ["exit=two"], "invalid value for export.exit"),
    ],
)
def test_bad_export_input_is_one_line_and_exit_code_2(embedding_run, tmp_path, run_cli, command, args, message):
    taken = tmp_path / "taken"
    taken.mkdir()
    defaults = {"run_dir": str(embedding_run), "out": str(tmp_path / "out")}
    words = []
    for arg in args:
        if arg == "OUT_EXISTS":
            defaults["out"] = str(taken)
        elif arg == "NOT_A_RUN":
            defaults["run_dir"] = str(taken)
        else:
            words.append(arg)
            defaults.pop(arg.split("=")[0], None)
    if command == "gguf" and defaults.get("out", "").endswith("out"):
        defaults["out"] += ".gguf"
    code, _, err = run_cli("export", command, *words, *(f"{k}={v}" for k, v in defaults.items()))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing written


def test_cli_shorthand_exports_a_draft(mixed_run, tmp_path, run_cli):
    out = tmp_path / "d"
    code, _, err = run_cli("export", "draft", f"run_dir={mixed_run}", "exit=2", f"out={out}")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["eetune_draft"]["exit"]["layer"] == 2
