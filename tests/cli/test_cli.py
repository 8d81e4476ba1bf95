"""The command line: config composition, overrides, recipes, and one-line errors with exit 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from eetune.config import compose_config, list_recipes
from eetune.errors import EetuneError


def test_print_config_shows_overrides_applied(run_cli):
    code, out, _ = run_cli(
        "augment", "recipe=smollm2_135m", "exits.layers=[8,16,24]", "exits.arch=norm",
        "--print-config",
    )
    assert code == 0
    cfg = yaml.safe_load(out)
    assert cfg["exits"]["layers"] == [8, 16, 24]
    assert cfg["exits"]["arch"] == "norm"
    assert cfg["stage"] == "augment"
    assert cfg["model"]["name"] == "smollm2_135m"
    assert cfg["run_dir"].startswith("runs/augment-")


def test_group_override_swaps_a_whole_section():
    cfg = compose_config("augment", ["model=llama2_13b", "exits=norm"])
    assert cfg.model.name == "llama2_13b" and cfg.model.dtype == "bfloat16"
    assert cfg.exits.arch == "norm" and list(cfg.exits.layers) == [8, 16, 24]


def test_auto_dtype_is_bf16_only_where_the_device_computes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        assert compose_config("tune", ["recipe=smollm2_135m_quickstart"]).model.dtype == expected
        assert compose_config("augment", ["model.dtype=auto"]).model.dtype == expected
        # plan sizes GPUs, not this machine.
        assert compose_config("plan", ["recipe=smollm2_135m"]).model.dtype == "bfloat16"
    # An explicit dtype is kept as given.
    assert compose_config("tune", ["recipe=smollm2_135m", "model.dtype=bfloat16"]).model.dtype == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compose_config("tune", ["model.dtype=auto", "model.device=cuda"]).model.dtype == "float32"


@pytest.mark.parametrize(
    "args, message",
    [
        (["exits.layerz=[1]"], "unknown key 'exits.layerz' — did you mean 'exits.layers'?"),
        (["model.dtyp=float32"], "did you mean 'model.dtype'?"),
        (["model.max_seq_len=abc"], "invalid value for model.max_seq_len"),
        (["exits.arch=conv"], "exits.arch='conv' is not one of: embedding, norm, mlp, layer"),
        (["exits.layers=[2,2]"], "has duplicates"),
        (["exits.layers=[]"], "exits.layers is empty"),
        (["recipe=smollm"], "unknown recipe 'smollm' — did you mean 'smollm2_135m'?"),
        (["recipe=/nope/mine.yaml"], "recipe file not found"),
        (["model=llama2_13x"], "did you mean 'llama2_13b'?"),
        (["data=jsonl"], "data.path"),
        (["generate.temperature=-1"], "must be >= 0"),
        (["exits.layers=[8"], "cannot parse override"),
    ],
)
def test_bad_config_is_one_line_and_exit_code_2(run_cli, args, message):
    code, out, err = run_cli("augment", *args, "--print-config")
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert message in err


def test_unknown_key_inside_a_user_recipe_is_reported_with_its_full_key(tmp_path, run_cli):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("defaults:\n  - eetune_schema\n  - model: smollm2_135m\n  - _self_\nmodel:\n  nmae: x\n")
    code, _, err = run_cli("augment", f"recipe={recipe}", "--print-config")
    assert code == 2
    assert "unknown key 'model.nmae'" in err and "did you mean 'model.name'?" in err


def test_recipes_list_show_and_copy_round_trip(tmp_path, run_cli):
    code, out, _ = run_cli("recipes", "list")
    assert code == 0
    for name in list_recipes():
        assert name in out
    assert "llama2_13b" in out  # config groups are listed too

    code, out, _ = run_cli("recipes", "show", "smollm2_135m")
    assert code == 0 and "exits: mlp" in out

    dest = tmp_path / "my_recipe.yaml"
    assert run_cli("recipes", "copy", "smollm2_135m", str(dest))[0] == 0
    assert dest.read_text() == Path("recipes/smollm2_135m.yaml").read_text()
    code, _, err = run_cli("recipes", "copy", "smollm2_135m", str(dest))
    assert code == 2 and "already exists" in err

    # The copy composes like the original, from anywhere, and takes overrides.
    copied = compose_config("augment", [f"recipe={dest}", "exits.layers=[3]"])
    original = compose_config("augment", ["recipe=smollm2_135m", "exits.layers=[3]"])
    copied.run_dir = original.run_dir = "x"
    assert copied == original


def test_generate_flags_override_config_without_hydra_quoting(run_cli):
    prompt = "What's 2+2, [really]? a=b"
    code, out, _ = run_cli("generate", "--prompt", prompt, "-n", "7", "--no-chat", "--print-config")
    assert code == 0
    cfg = yaml.safe_load(out)["generate"]
    assert cfg["prompt"] == prompt and cfg["max_new_tokens"] == 7 and cfg["chat"] is False


def test_console_script_prints_no_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "eetune.cli", "augment", "optim.lrr=3e-4"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: unknown key 'optim.lrr'")


def test_default_recipe_composes_and_a_mistyped_seed_fails():
    cfg = compose_config("augment", [])
    assert cfg.exits.arch == "mlp" and cfg.exits.head == "shared" and cfg.data.source == "pydoc"
    with pytest.raises(EetuneError):
        compose_config("augment", ["seed=notanint"])


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_composes_for_every_stage(recipe):
    extra = ["data.path=/data/train.jsonl", "model.checkpoint_dir=/ckpt"]
    for stage in ("augment", "tune", "generate"):
        cfg = compose_config(stage, [f"recipe={recipe}", *extra])
        assert cfg.stage == stage and cfg.exits.layers


def test_generate_mode_flags_reach_the_config_and_are_validated(run_cli):
    code, out, _ = run_cli(
        "generate", "--prompt", "x", "--mode", "self_speculative", "--run-dir", "runs/a",
        "--draft-exit", "24", "--draft-len", "3", "--print-config",
    )
    assert code == 0
    cfg = yaml.safe_load(out)["generate"]
    assert (cfg["mode"], cfg["run_dir"], cfg["draft_exit"], cfg["draft_len"]) == ("self_speculative", "runs/a", 24, 3)
    code, _, err = run_cli("generate", "--prompt", "x", "--threshold", "1.5", "--print-config")
    assert code == 2 and "generate.threshold=1.5 must be in (0, 1]" in err
    code, _, err = run_cli("generate", "--prompt", "x", "--mode", "fast", "--print-config")
    assert code == 2 and "generate.mode='fast' is not one of" in err
    code, out, _ = run_cli("generate", "--prompt", "x", "--exit-thresholds", "0.9/0.8/1", "--print-config")
    assert code == 0 and yaml.safe_load(out)["generate"]["exit_thresholds"] == [0.9, 0.8, 1.0]
    for flags, message in (
        (["--exit-thresholds", "0.9/high"], "--exit-thresholds '0.9/high': give one threshold per exit joined by '/'"),
        (["--exit-thresholds", "0.9/0"], "generate.exit_thresholds has 0.0: each threshold must be in (0, 1]"),
        (["--exit-thresholds", "0.9/1", "--threshold", "0.5"], "generate.threshold and generate.exit_thresholds are both set"),
    ):
        code, _, err = run_cli("generate", "--prompt", "x", *flags, "--print-config")
        assert code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(("field", "value", "message"), [
    ("draft_len", 65, "draft_len=65 must be in 1..64"),
    ("draft_vocab", 0, "draft_vocab=0 must be >= 1 (or null for the whole vocabulary)"),
    ("draft_confidence", 1.5, "draft_confidence=1.5 must be in (0, 1] (or null)"),
    ("draft_schedule", "greedy", "draft_schedule='greedy' is not one of: constant, adaptive"),
])
def test_generate_and_serve_share_the_exit_policy_checks(field, value, message):
    """One ExitPolicyConfig: generate checks it at composition, serve when it starts (validate_run)."""
    from eetune.config.schema import ExitPolicyConfig
    from eetune.infer.settings import EXIT_FIELDS

    assert tuple(ExitPolicyConfig().policy()) == EXIT_FIELDS
    with pytest.raises(EetuneError) as caught:
        compose_config("generate", [f"generate.{field}={value}"])
    assert str(caught.value) == f"generate.{message}"
    with pytest.raises(EetuneError) as caught:
        # Closed choices already fail at composition; ranges when serve starts.
        compose_config("serve", [f"serve.{field}={value}"]).serve.validate_run()
    assert str(caught.value) == f"serve.{message}"


def test_compose_config_returns_the_typed_config():
    from eetune.config import schema

    cfg = compose_config("tune", ["data.mix=[{source:pydoc,weight:1.0}]"])
    assert isinstance(cfg, schema.EetuneConfig)
    sections = {
        "model": schema.ModelConfig, "exits": schema.ExitsConfig, "data": schema.DataConfig,
        "generate": schema.GenerateConfig, "optim": schema.OptimConfig, "loss": schema.LossConfig,
        "train": schema.TrainConfig, "logger": schema.LoggerConfig, "distill": schema.DistillConfig,
        "serve": schema.ServeConfig, "eval": schema.EvalConfig, "export": schema.ExportConfig,
        "parallel": schema.ParallelConfig, "plan": schema.PlanConfig,
    }
    for name, kind in sections.items():
        assert isinstance(getattr(cfg, name), kind), name
    assert isinstance(cfg.data.mix[0], schema.DataSourceConfig)
    assert all(isinstance(task, schema.EvalTaskConfig) for task in cfg.eval.tasks)


# Checked at composition (section.validate()), or by the stage that reads the section
# (section.validate_run(): `--print-config` and other stages take those values as they are).
@pytest.mark.parametrize(("section", "field", "value", "message", "at_compose"), [
    ("model", "dtype", "float8", "model.dtype='float8' is not one of: auto, float32, bfloat16, float16", True),
    ("model", "max_seq_len", 0, "model.max_seq_len=0 must be positive", True),
    ("exits", "layers", [], "exits.layers is empty: give at least one layer, e.g. exits.layers=[8,16,24]", True),
    ("data", "heldout_fraction", 1.5, "data.heldout_fraction=1.5 must be in (0, 1)", True),
    ("data", "batch_size", 0, "data.batch_size=0 must be >= 1", False),
    ("generate", "temperature", -1.0, "generate.temperature=-1.0 must be >= 0 (0 = greedy)", True),
    ("serve", "mode", "fast", "serve.mode='fast' is not one of: full, early_exit, self_speculative", True),
    ("serve", "port", 70000, "serve.port=70000 must be in 0..65535 (0 picks a free port)", False),
    ("eval", "thresholds", [],
     "eval.thresholds is empty: give thresholds in (0, 1], e.g. eval.thresholds=[1.0,0.8,0.4]", False),
    ("optim", "decay", "step", "optim.decay='step' is not one of: cosine, linear, constant", True),
    ("optim", "grad_accum", 0, "optim.grad_accum=0 must be >= 1", False),
    ("loss", "kd_alpha", 2.0, "loss.kd_alpha=2.0 must be in [0, 1]", False),
    ("train", "steps", 0, "train.steps=0 must be >= 1", False),
    ("logger", "kind", "tb", "logger.kind='tb' is not one of: none, wandb", True),
    ("distill", "batch_size", 0, "distill.batch_size=0 must be >= 1", False),
    ("export", "format", "onnx", "export.format='onnx' is not one of: draft, hf, gguf", True),
    ("parallel", "backend", "mpi", "parallel.backend='mpi' is not one of: auto, gloo, nccl", True),
])
def test_each_section_validates_itself_with_the_one_line_message(section, field, value, message, at_compose):
    cfg = compose_config("augment", [])
    part = getattr(cfg, section)
    setattr(part, field, value)
    check = part.validate if at_compose else part.validate_run
    with pytest.raises(EetuneError) as caught:
        check(cfg.stage) if (section, at_compose) == ("data", True) else check()
    assert str(caught.value) == message
    override = f"{section}.{field}={value}" if not isinstance(value, list) else f"{section}.{field}=[]"
    if at_compose:  # the top level runs it, and so does composition, with the same message
        with pytest.raises(EetuneError, match=re.escape(message)):
            cfg.validate()
        with pytest.raises(EetuneError) as composed:
            compose_config("augment", [override])
        assert str(composed.value) == message
    else:
        compose_config("augment", [override])
        if section in ("loss", "train", "optim", "data"):
            with pytest.raises(EetuneError, match=re.escape(message)):
                cfg.validate_tune()
