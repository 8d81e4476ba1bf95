"""`augment` and `generate` stages end to end on the real SmolLM2 (loaded once per session)."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from eetune.cli import main
from eetune.config import compose_config
from eetune.errors import EetuneError
from eetune.exits import load_exits, loading
from eetune.stages import augment, generate


@pytest.fixture
def use_smollm2(monkeypatch, smollm2):
    """Stages load the session's SmolLM2 instead of reading it from disk again."""
    monkeypatch.setattr(augment, "load_base_model", lambda name, **kwargs: smollm2)
    # generate loads through eetune.exits.loading.load_model, which calls load_base_model there.
    monkeypatch.setattr(loading, "load_base_model", lambda name, **kwargs: smollm2)
    return smollm2


def augment_cfg(run_dir, *overrides):
    return compose_config(
        "augment", [f"run_dir={run_dir}", "data.seq_len=64", "data.heldout_sequences=2", *overrides]
    )


def test_augment_writes_a_complete_run_dir_that_loads_back(tmp_path, use_smollm2):
    run_dir = tmp_path / "aug"
    cfg = augment_cfg(run_dir, "exits.layers=[8,16,24]", "exits.arch=mlp")
    result = augment.run(cfg)

    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "exits.safetensors", "manifest.json"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["exits"]["layers"] == [8, 16, 24]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["base_model"]["fingerprint"] == use_smollm2.fingerprint
    assert manifest["base_model"]["num_layers"] == 30
    assert [e["layer"] for e in manifest["exits"]] == [8, 16, 24]

    # An mlp exit with a shared head: two norms of 576 and a 576x1536 gated MLP.
    per_exit = 2 * 576 + 3 * 576 * 1536
    assert result.exit_parameters == {8: per_exit, 16: per_exit, 24: per_exit}
    state = load_file(str(run_dir / "exits.safetensors"))
    assert sum(t.numel() for t in state.values()) == 3 * per_exit

    # Before tuning, copied mlp exits are far worse than the final layer.
    final = result.quality[30]
    assert 1.0 < final.cross_entropy < 5.0 and final.agreement == 1.0
    for layer in (8, 16, 24):
        assert result.quality[layer].cross_entropy > final.cross_entropy + 2.0
    assert manifest["heldout_before_tuning"]["30"]["cross_entropy"] == pytest.approx(final.cross_entropy)

    model = load_exits(run_dir, use_smollm2.model, use_smollm2.fingerprint)
    tokens = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    logits = model(tokens, exits=[8])[8]
    assert logits.shape == (1, 6, 49152) and torch.isfinite(logits).all()


def test_augment_never_overwrites_an_existing_run_dir(tmp_path, use_smollm2):
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("mine")
    with pytest.raises(EetuneError, match="already exists"):
        augment.run(augment_cfg(run_dir))
    assert [p.name for p in run_dir.iterdir()] == ["keep.txt"]


def test_a_failing_augment_leaves_nothing_half_written(tmp_path, use_smollm2, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(augment, "save_exits", broken_save)
    with pytest.raises(OSError):
        augment.run(augment_cfg(tmp_path / "aug"))
    assert list(tmp_path.iterdir()) == []


def test_exits_that_do_not_fit_the_model_fail_in_one_line_with_exit_2(tmp_path, use_smollm2, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["eetune", "augment", "exits.layers=[8,30]", f"run_dir={tmp_path / 'a'}"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: exit at layer 30 does not fit a 30-layer model: exit layers must be in 1..29\n"
    assert not (tmp_path / "a").exists()


def test_generate_answers_the_capital_of_france_with_paris(use_smollm2):
    cfg = compose_config("generate", ["generate.max_new_tokens=24"])
    cfg.generate.prompt = "What is the capital of France?"
    out = io.StringIO()
    result = generate.run(cfg, out=out)
    assert "Paris" in result.text
    # What was streamed is what was generated.
    assert out.getvalue().strip() == result.text.strip()
    assert result.result.stopped_by in ("eos", "length")
    assert set(result.result.exit_layers) == {30}


def test_generate_without_a_prompt_is_a_user_error(use_smollm2):
    with pytest.raises(EetuneError, match="no prompt"):
        generate.run(compose_config("generate", []))
    cfg = compose_config("generate", ["generate.mode=early_exit"])
    cfg.generate.prompt = "hi"
    with pytest.raises(EetuneError, match="needs exits: pass --run-dir"):
        generate.run(cfg)


def test_self_speculative_and_early_exit_generation_through_the_stage(tmp_path, use_smollm2):
    augment.run(augment_cfg(tmp_path / "aug", "exits.layers=[12,24]", "exits.arch=norm"))

    def run_mode(*overrides):
        cfg = compose_config("generate", ["generate.max_new_tokens=20", f"generate.run_dir={tmp_path / 'aug'}", *overrides])
        cfg.generate.prompt = "Name three colours of the rainbow."
        out = io.StringIO()
        return generate.run(cfg, out=out), out.getvalue()

    full, _ = run_mode("generate.mode=full")
    spec, _ = run_mode("generate.mode=self_speculative", "generate.draft_exit=24", "generate.draft_len=3")
    assert spec.result.tokens == full.result.tokens  # lossless
    assert spec.result.draft_tokens > 0 and 0 <= spec.result.acceptance_rate <= 1
    early, streamed = run_mode("generate.mode=early_exit", "generate.threshold=0.2", "generate.color=true")
    assert any(layer < 30 for layer in early.result.exit_layers)
    assert streamed.strip() == early.text.strip()  # colour adds no characters to a non-terminal stream
    line = generate.summary_line(early.result, 30)
    assert "mean layers" in line and "exit layers {" in line
