"""EarlyExitModel wiring on a tiny random llama: exact reproductions, depth, trainability, IO."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from torchtune.models.llama3_2._component_builders import llama3_2

from eetune.errors import EetuneError
from eetune.exits import (
    EXITS_FILE,
    EarlyExitModel,
    ExitSpec,
    build_manifest,
    check_specs,
    exit_arch_names,
    get_exit_arch,
    load_exits,
    register_exit_arch,
    save_exits,
)
from eetune.exits.archs import unregister_exit_arch

NUM_LAYERS = 4
VOCAB = 256


def tiny_llama(seed: int = 0, tied: bool = True):
    torch.manual_seed(seed)
    model = llama3_2(
        vocab_size=VOCAB, num_layers=NUM_LAYERS, num_heads=4, num_kv_heads=2, embed_dim=64,
        max_seq_len=128, intermediate_dim=128, rope_base=100000, scale_factor=1, norm_eps=1e-5,
        tie_word_embeddings=tied,
    )
    # Random norms so that "copied norm" is distinguishable from a fresh one.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def tokens():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tied", [True, False])
def test_norm_exit_with_copied_head_after_last_layer_reproduces_model_logits(tokens, tied):
    backbone = tiny_llama(tied=tied)
    expected = backbone(tokens)
    model = EarlyExitModel(backbone, [ExitSpec(NUM_LAYERS, arch="norm", init="copy", head="copy")])
    logits = model(tokens)[NUM_LAYERS]
    assert torch.equal(logits, expected)
    # The copied head is a separate trainable tensor, not the embedding itself.
    assert model.exit(NUM_LAYERS).head.weight.data_ptr() != backbone.tok_embeddings.weight.data_ptr()


def test_layer_exit_copied_from_last_layer_after_layer_n_minus_1_reproduces_model_logits(tokens):
    backbone = tiny_llama()
    expected = backbone(tokens)
    model = EarlyExitModel(backbone, [ExitSpec(NUM_LAYERS - 1, arch="layer", init="copy", head="shared")])
    logits = model(tokens)[NUM_LAYERS - 1]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def test_mlp_exit_copies_its_own_layers_mlp_and_the_final_norm(tokens):
    backbone = tiny_llama()
    model = EarlyExitModel(backbone, [ExitSpec(2, arch="mlp", init="copy", head="shared")])
    exit_ = model.exit(2)
    source = backbone.layers[1]  # layer 2, 1-based
    assert torch.equal(exit_.mlp.w1.weight, source.mlp.w1.weight)
    assert torch.equal(exit_.mlp_norm.scale, source.mlp_norm.scale)
    assert torch.equal(exit_.norm.scale, backbone.norm.scale)
    # By hand: h2 + MLP(mlp_norm(h2)), final norm, shared head.
    with torch.no_grad():
        h = backbone.tok_embeddings(tokens)
        for layer in backbone.layers[:2]:
            h = layer(h)
        h = h + source.mlp(source.mlp_norm(h))
        expected = torch.nn.functional.linear(backbone.norm(h), backbone.tok_embeddings.weight)
    torch.testing.assert_close(model(tokens)[2], expected, rtol=0, atol=1e-6)


def test_norm_init_ones_copies_the_mlp_but_starts_norms_at_identity():
    backbone = tiny_llama()
    with torch.no_grad():  # non-trivial scales, so copying and resetting differ
        backbone.norm.scale.uniform_(0.5, 2.0)
        backbone.layers[1].mlp_norm.scale.uniform_(0.5, 2.0)
    copied = EarlyExitModel(backbone, [ExitSpec(2, arch="mlp", norm_init="copy")]).exit(2)
    ones = EarlyExitModel(backbone, [ExitSpec(2, arch="mlp", norm_init="ones")]).exit(2)
    assert torch.equal(copied.norm.scale, backbone.norm.scale)
    assert torch.equal(ones.mlp.w2.weight, backbone.layers[1].mlp.w2.weight)
    for norm in (ones.norm, ones.mlp_norm):
        assert torch.equal(norm.scale, torch.ones_like(norm.scale))


def test_embedding_exit_is_the_head_on_the_raw_layer_output(tokens):
    backbone = tiny_llama()
    model = EarlyExitModel(backbone, [ExitSpec(1, arch="embedding", init="copy", head="copy")])
    with torch.no_grad():
        h = backbone.layers[0](backbone.tok_embeddings(tokens))
        expected = h @ backbone.tok_embeddings.weight.T
    torch.testing.assert_close(model(tokens)[1], expected, rtol=0, atol=1e-6)


def test_forward_never_runs_layers_past_the_deepest_requested_exit(tokens):
    backbone = tiny_llama()
    model = EarlyExitModel(backbone, [ExitSpec(1), ExitSpec(2)])
    calls = [0] * NUM_LAYERS
    for i, layer in enumerate(backbone.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    out = model(tokens)
    assert sorted(out) == [1, 2]
    assert calls == [1, 1, 0, 0]
    model(tokens, exits=[1])
    assert calls == [2, 1, 0, 0]
    out = model(tokens, exits=[1], include_final=True)
    assert sorted(out) == [1, NUM_LAYERS] and calls == [3, 2, 1, 1]
    torch.testing.assert_close(out[NUM_LAYERS], backbone(tokens))


def test_exit_hidden_state_is_the_output_of_layer_l_not_its_input(tokens):
    backbone = tiny_llama()
    model = EarlyExitModel(backbone, [ExitSpec(3)])
    with torch.no_grad():
        h = backbone.tok_embeddings(tokens)
        for layer in backbone.layers[:3]:
            h = layer(h)
    assert torch.equal(model.hidden_states(tokens, [3])[3], h)


# (embedding, shared) has nothing to train and is rejected by check_specs.
TRAINABLE_KINDS = [(a, h) for a in ("embedding", "norm", "mlp", "layer") for h in ("shared", "copy")][1:]


@pytest.mark.parametrize("arch, head", TRAINABLE_KINDS)
def test_only_exit_parameters_require_grad_and_gradients_reach_only_exits(tokens, arch, head):
    backbone = tiny_llama()
    model = EarlyExitModel(backbone, [ExitSpec(2, arch=arch, head=head, init="random")])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("exits.2.") for name in trainable)
    assert not any(p.requires_grad for p in backbone.parameters())
    loss = model(tokens)[2].logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.exit_parameters())
    assert all(p.grad is None for p in backbone.parameters())
    has_head = any(name.endswith("head.weight") for name in trainable)
    assert has_head == (head == "copy")


def test_random_init_draws_fresh_weights_and_copy_init_does_not(tokens):
    backbone = tiny_llama()
    random = EarlyExitModel(backbone, [ExitSpec(2, arch="mlp", init="random", head="copy")], init_std=0.02).exit(2)
    assert not torch.equal(random.mlp.w1.weight, backbone.layers[1].mlp.w1.weight)
    assert abs(random.mlp.w1.weight.std().item() - 0.02) < 0.004
    assert abs(random.head.weight.std().item() - 0.02) < 0.004
    assert torch.equal(random.norm.scale, torch.ones_like(random.norm.scale))


@pytest.mark.parametrize(
    "specs, message",
    [
        ([ExitSpec(0)], "does not fit a 4-layer model"),
        ([ExitSpec(4)], "does not fit a 4-layer model"),
        ([ExitSpec(2), ExitSpec(2)], "two exits at layer 2"),
        ([ExitSpec(2, arch="conv")], "unknown exit arch 'conv'"),
        ([ExitSpec(2, init="zeros")], "unknown exit init"),
        ([ExitSpec(2, norm_init="zeros")], "unknown exit norm_init"),
        ([ExitSpec(2, arch="embedding", head="shared")], "nothing to train"),
        ([], "no exits given"),
    ],
)
def test_bad_exit_specs_fail_clearly(specs, message):
    with pytest.raises(EetuneError, match=message):
        check_specs(specs, NUM_LAYERS)


def _base_info(fingerprint: str) -> dict:
    return {"name": "tiny", "fingerprint": fingerprint, "num_layers": NUM_LAYERS, "checkpoint_dir": None}


def test_exit_checkpoint_round_trips_exit_weights_only(tmp_path, tokens):
    backbone = tiny_llama()
    specs = [ExitSpec(1, "norm", "random", "copy"), ExitSpec(2, "mlp", "random"), ExitSpec(3, "layer", "random")]
    model = EarlyExitModel(backbone, specs)
    save_exits(tmp_path, model, build_manifest(model, _base_info("abc"), stage="augment"))

    state = load_file(str(tmp_path / EXITS_FILE))
    assert all(not key.startswith("backbone") for key in state)
    assert sum(t.numel() for t in state.values()) == sum(p.numel() for p in model.exits.parameters())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [e["layer"] for e in manifest["exits"]] == [1, 2, 3]
    assert manifest["versions"]["torch"].startswith("2.13")

    reloaded = load_exits(tmp_path, tiny_llama(), fingerprint="abc")
    assert reloaded.specs == model.specs
    for layer, logits in model(tokens).items():
        assert torch.equal(reloaded(tokens)[layer], logits)


def test_loading_exits_onto_another_base_model_names_both_fingerprints(tmp_path):
    model = EarlyExitModel(tiny_llama(), [ExitSpec(2)])
    save_exits(tmp_path, model, build_manifest(model, _base_info("aaaa1111"), stage="augment"))
    with pytest.raises(EetuneError, match="aaaa1111.*bbbb2222"):
        load_exits(tmp_path, tiny_llama(seed=1), fingerprint="bbbb2222")


def test_loading_from_a_dir_that_is_not_a_run_fails_clearly(tmp_path):
    with pytest.raises(EetuneError, match="run dir not found"):
        load_exits(tmp_path / "nope", tiny_llama(), fingerprint="x")
    with pytest.raises(EetuneError, match="has no manifest.json"):
        load_exits(tmp_path, tiny_llama(), fingerprint="x")


# --- the exit-arch registry: a new architecture is one registry entry ---------------------------


@pytest.fixture
def throwaway_arch():
    """`norm` again under another name, registered for one test and removed after it."""
    arch = register_exit_arch(dataclasses.replace(get_exit_arch("norm"), name="norm_again"))
    try:
        yield arch
    finally:
        unregister_exit_arch(arch.name)
    assert "norm_again" not in exit_arch_names()


def test_an_arch_registered_in_the_registry_alone_builds_plans_and_exports_as_a_draft(
    throwaway_arch, tiny_base_model, tokens
):
    from eetune.export.draft import build_draft, check_exportable
    from eetune.models import build_decoder
    from eetune.parallel.plan import Shape, exit_params

    base = tiny_base_model
    layers = len(base.model.layers)
    spec = ExitSpec(2, "norm_again", "copy", "copy")
    check_specs([spec], layers)  # the user gate knows it
    model = EarlyExitModel(base.model, [spec])
    with torch.no_grad():  # move the exit off its copied weights, so the draft must carry the exit's own
        for param in model.exits.parameters():
            param.mul_(1.1)
    # Builds: the norm exit's module, with its own norm and head.
    exit_module = model.exit(2)
    assert type(exit_module).__name__ == "NormExit" and exit_module.head is not None
    # Plan: its parameters are counted as `norm`'s are.
    shape = Shape.from_config(base.family, base.hf_config)
    assert exit_params(spec, shape) == exit_params(ExitSpec(2, "norm", "copy", "copy"), shape) == (64, 256 * 64)
    assert exit_params(spec, shape) == (sum(p.numel() for n, p in exit_module.named_parameters() if not n.startswith("head.")),
                                        exit_module.head.weight.numel())
    # Export: layers 1..2 + the exit, a plain decoder of the family whose logits are the exit's.
    check_exportable({2: "norm_again"}, 2, "this model")
    draft = build_draft(model, 2, base.hf_config)
    assert draft.num_layers == 2
    decoder = build_decoder(base.family, draft.hf_config, 64)
    decoder.load_state_dict(draft.state_dict, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(decoder.eval()(tokens), model(tokens, exits=[2])[2], rtol=0, atol=1e-5)
