"""The `tune` stage on a tiny random model: outputs, exactness, resume, cache, logging, errors."""

from __future__ import annotations

import io
import json
import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from rich.console import Console
from safetensors.torch import load_file

from eetune.config import compose_config
from eetune.errors import EetuneError
from eetune.exits import load_exits
from eetune.models import fingerprint, get_model_entry, load_base_model
from eetune.models.tiny import write_tiny_checkpoint
from eetune.data import load_tuning_data
from eetune.stages import tune
from eetune.train.needs import build_model
from eetune.train.trainer import Trainer
from eetune.train.schedule import FlatStop, exit_weight, lr_factor


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~6k characters of real English: about 20 batches of 4 x 64 byte-level tokens per epoch."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(topics["assignment"][:6000])
    return path


def tune_cfg(tiny_base_model, corpus, run_dir, *overrides):
    return compose_config(
        "tune",
        [
            f"model.checkpoint_dir={tiny_base_model.checkpoint_dir}",
            f"run_dir={run_dir}",
            "data=text", f"data.path={corpus}", "data.seq_len=64", "data.batch_size=4",
            "exits.layers=[1,2,3]", "optim.lr=1e-2", "optim.warmup_steps=2",
            "train.steps=12", "train.checkpoint_every=4",
            *overrides,
        ],
    )


def exit_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "exits.safetensors"))


def test_tune_writes_a_run_dir_and_improves_every_exit(tiny_base_model, corpus, tmp_path):
    run_dir = tmp_path / "run"
    result = tune.run(tune_cfg(tiny_base_model, corpus, run_dir))

    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "manifest.json", "exits.safetensors", "metrics.jsonl", "loss_curve.png", "state"} <= names
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stage"] == "tune" and manifest["tune"]["steps"] == 12
    assert manifest["tune"]["tokens_seen"] == 12 * 4 * 64 == result.tokens_seen
    for layer in (1, 2, 3):
        assert result.after[layer].cross_entropy < result.before[layer].cross_entropy - 0.5
    final = tiny_base_model.num_layers
    assert result.after[final].cross_entropy == pytest.approx(result.before[final].cross_entropy)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "ce/exit_1" in r]
    assert [r["step"] for r in trained] == list(range(1, 13))
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in trained)
    # Warmup then cosine decay: lr rises for 2 steps, then falls to 10% at the end.
    lrs = [r["lr"] for r in trained]
    assert lrs[0] < lrs[1] and lrs[-1] == pytest.approx(1e-3)

    # The run dir is what eval/serve load: same format as augment, same base fingerprint.
    model = load_exits(run_dir, tiny_base_model.model, tiny_base_model.fingerprint)
    assert model.exit_layers == [1, 2, 3]


def test_backbone_is_untouched_and_only_exits_are_optimised(tiny_base_model, corpus, tmp_path):
    before = fingerprint(tiny_base_model.model.state_dict())
    cfg = tune_cfg(tiny_base_model, corpus, tmp_path / "run", "train.steps=3")
    base = load_base_model("smollm2_135m", checkpoint_dir=tiny_base_model.checkpoint_dir)
    model = build_model(cfg, base)
    trainer = Trainer(cfg, base, model, load_tuning_data(cfg.data, base.tokenizer), tmp_path / "run", None)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.exits.parameters()}
    backbone_before = {k: v.clone() for k, v in base.model.state_dict().items()}
    trainer.train_step()
    assert all(torch.equal(v, backbone_before[k]) for k, v in base.model.state_dict().items())
    assert fingerprint(tiny_base_model.model.state_dict()) == before


def test_gradient_accumulation_equals_one_big_batch(tiny_base_model, corpus, tmp_path):
    common = ("train.steps=2", "train.checkpoint_every=0", "data.shuffle=false", "optim.grad_clip=0")
    tune.run(tune_cfg(tiny_base_model, corpus, tmp_path / "big", "data.batch_size=4", *common))
    tune.run(tune_cfg(tiny_base_model, corpus, tmp_path / "acc", "data.batch_size=2", "optim.grad_accum=2", *common))
    big, acc = exit_state(tmp_path / "big"), exit_state(tmp_path / "acc")
    for key in big:
        # One batch of 4 and two of 2 sum in different orders: within 1e-6 on AVX2, 1.7e-6 (one
        # thread) to 1.8e-5 (two) with AVX-512 kernels, Adam scaling a near-zero gradient's noise up.
        # A dropped micro-batch moves the weights by 0.029.
        torch.testing.assert_close(acc[key], big[key], rtol=0, atol=1e-4)


def test_hidden_state_cache_gives_the_same_losses(tiny_base_model, corpus, tmp_path):
    """The cache (exit and final states, and the teacher's argmax the CE targets) repeats an
    uncached run; stored in bf16 it takes half the disk and stays within bf16 rounding of it."""
    # 30 steps of 4 examples span two epochs (~20 batches each): the second reads the cache.
    common = ("train.steps=30", "train.checkpoint_every=0", "loss.kd_alpha=0.5", "loss.ce_target=teacher")
    tune.run(tune_cfg(tiny_base_model, corpus, tmp_path / "plain", *common))
    tune.run(tune_cfg(tiny_base_model, corpus, tmp_path / "cached", "data.cache_hidden=true", *common))
    cache = tmp_path / "cached" / "hidden_cache"
    assert (cache / "final.npy").is_file()
    plain = _train_losses(tmp_path / "plain")
    cached = _train_losses(tmp_path / "cached")
    assert len(plain) == 30 and plain == pytest.approx(cached, rel=0, abs=1e-6)
    for key, value in exit_state(tmp_path / "plain").items():
        torch.testing.assert_close(exit_state(tmp_path / "cached")[key], value, rtol=0, atol=1e-6)
    # The cached argmax is the LM head's over the cached final state.
    final, top1 = np.load(cache / "final.npy"), np.load(cache / "teacher_top1.npy")
    head = tiny_base_model.model.output.weight if hasattr(tiny_base_model.model.output, "weight") else (
        tiny_base_model.model.tok_embeddings.weight)
    expect = (torch.from_numpy(final[:4]) @ head.detach().T).argmax(-1)
    assert torch.equal(torch.from_numpy(top1[:4]), expect)

    tune.run(tune_cfg(tiny_base_model, corpus, tmp_path / "bf16", "data.cache_hidden=true",
                      "data.cache_dtype=bfloat16", *common))
    stored = np.load(tmp_path / "bf16" / "hidden_cache" / "final.npy", mmap_mode="r")
    assert stored.dtype == np.int16 and stored.nbytes * 2 == final.nbytes
    assert _train_losses(tmp_path / "bf16") == pytest.approx(plain, rel=2e-2)


def test_runs_sharing_a_cache_dir_fill_it_once_and_refuse_other_data(tiny_base_model, corpus, tmp_path):
    """A second run on the same model, data and exits reads the first one's states (the
    backbone never runs for training); its losses equal its own cached run's. Other data (a
    different seq_len) is refused with a clear error, and the shared states stay intact."""
    from eetune.train import strategy as strategy_module

    common = ("train.steps=6", "train.checkpoint_every=0", "loss.kd_alpha=0.5", "loss.ce_target=teacher",
              "data.cache_hidden=true")
    shared = tmp_path / "shared_cache"
    tune.run(tune_cfg(tiny_base_model, corpus, tmp_path / "first", f"data.cache_dir={shared}", *common))
    assert not (tmp_path / "first" / "hidden_cache").exists() and (shared / "identity.json").is_file()
    tune.run(tune_cfg(tiny_base_model, corpus, tmp_path / "own", *common, "optim.lr=3e-3"))

    calls = []
    original = strategy_module.SingleProcess.backbone_states

    def counting(self, model, tokens, layers, final, heldout=False):
        calls.append(heldout)
        return original(self, model, tokens, layers, final, heldout)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(strategy_module.SingleProcess, "backbone_states", counting)
        tune.run(tune_cfg(tiny_base_model, corpus, tmp_path / "second", f"data.cache_dir={shared}", *common,
                          "optim.lr=3e-3"))
    assert [h for h in calls if not h] == [], "the backbone ran for training although every state was cached"
    assert _train_losses(tmp_path / "second") == pytest.approx(_train_losses(tmp_path / "own"), rel=0, abs=1e-6)

    before = {p.name: p.read_bytes() for p in shared.iterdir()}
    with pytest.raises(EetuneError, match=r"holds states of another run \(.*train_tokens_sha256"):
        tune.run(tune_cfg(tiny_base_model, corpus, tmp_path / "other", f"data.cache_dir={shared}", *common,
                          "data.seq_len=16"))
    assert {p.name: p.read_bytes() for p in shared.iterdir()} == before
    with pytest.raises(EetuneError, match="data.cache_dir is where data.cache_hidden=true keeps"):
        tune.run(tune_cfg(tiny_base_model, corpus, tmp_path / "uncached", f"data.cache_dir={shared}"))


def _train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from eetune.config import compose_config
    from eetune.stages import tune
    from eetune.train.trainer import Trainer

    kill_at = int(sys.argv[1])
    original = Trainer.train_step

    def train_step(self):
        # Die hard in the middle of the run, after the step-8 checkpoint, mid-way to the next.
        if self.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self)

    Trainer.train_step = train_step
    tune.run(compose_config("tune", sys.argv[2:]))
    """
)


def test_sigkilled_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tiny_base_model, corpus, tmp_path):
    straight = tmp_path / "straight"
    tune.run(tune_cfg(tiny_base_model, corpus, straight))

    killed = tmp_path / "killed"
    cfg = tune_cfg(tiny_base_model, corpus, killed)
    overrides = [f"{key}={value}" for key, value in _flat_overrides(cfg)]
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), "10", *overrides], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (killed / "exits.safetensors").exists()
    state = torch.load(killed / "state" / "trainer.pt", weights_only=False)
    assert state["step"] == 8

    tune.run(tune_cfg(tiny_base_model, corpus, killed, "resume=true"))
    resumed, expected = exit_state(killed), exit_state(straight)
    assert resumed.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(9) == 1  # nothing logged twice


def _flat_overrides(cfg):
    return [
        ("model.checkpoint_dir", cfg.model.checkpoint_dir), ("run_dir", cfg.run_dir), ("data", "text"),
        ("data.path", cfg.data.path), ("data.seq_len", 64), ("data.batch_size", 4), ("exits.layers", "[1,2,3]"),
        ("optim.lr", 1e-2), ("optim.warmup_steps", 2), ("train.steps", 12), ("train.checkpoint_every", 4),
    ]


def test_resume_refuses_a_changed_config_and_a_dir_without_state(tiny_base_model, corpus, tmp_path):
    run_dir = tmp_path / "run"
    tune.run(tune_cfg(tiny_base_model, corpus, run_dir, "train.steps=4"))
    snapshot = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    # Every changed key is named, not only the first; train.steps may change alongside.
    both = r"config differs \(loss.kd_alpha was 0.0, now 0.5, optim.lr was 0.01, now 0.02\)"
    with pytest.raises(EetuneError, match=both):
        tune.run(tune_cfg(tiny_base_model, corpus, run_dir, "train.steps=8", "optim.lr=2e-2", "loss.kd_alpha=0.5",
                          "resume=true"))
    with pytest.raises(EetuneError, match="already exists and is not empty"):
        tune.run(tune_cfg(tiny_base_model, corpus, run_dir, "train.steps=4"))
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == snapshot
    with pytest.raises(EetuneError, match="holds no interrupted tune run"):
        tune.run(tune_cfg(tiny_base_model, corpus, tmp_path / "empty", "resume=true"))


def _trained(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_resume_with_more_steps_extends_a_finished_run_on_the_longer_schedule(tiny_base_model, corpus, tmp_path):
    # Warmup 2 then cosine: the first 3 steps have the same lr under any total, so 3 steps extended
    # to 12 must equal 12 straight steps, provided step 3 on uses the 12-step schedule (the 3-step
    # one has decayed to its minimum there).
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    tune.run(tune_cfg(tiny_base_model, corpus, straight))
    tune.run(tune_cfg(tiny_base_model, corpus, extended, "train.steps=3"))
    result = tune.run(tune_cfg(tiny_base_model, corpus, extended, "train.steps=12", "train.log_every=2",
                               "resume=true"))

    assert result.steps == 12 and result.tokens_seen == 12 * 4 * 64
    expected, got = exit_state(straight), exit_state(extended)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
    lrs = {r["step"]: r["lr"] for r in _trained(extended)}
    assert sorted(lrs) == [1, 2, 3, 4, 6, 8, 10, 12]  # log_every=2 from the resume on
    assert lrs == pytest.approx({r["step"]: r["lr"] for r in _trained(straight) if r["step"] in lrs}, rel=1e-12)
    saved = OmegaConf.load(extended / "config.yaml")
    assert saved.train.steps == 12 and saved.train.log_every == 2 and saved.resume is False
    manifest = json.loads((extended / "manifest.json").read_text())
    assert manifest["tune"]["steps"] == 12


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_resume_of_a_finished_run_changes_nothing(tiny_base_model, corpus, tmp_path):
    run_dir = tmp_path / "run"
    done = tune.run(tune_cfg(tiny_base_model, corpus, run_dir, "train.steps=4"))
    files = _files(run_dir)
    out = io.StringIO()
    # A cadence change does not make a finished run unfinished; only a larger train.steps does.
    again = tune.run(tune_cfg(tiny_base_model, corpus, run_dir, "train.steps=4", "train.eval_every=1",
                              "resume=true"), Console(file=out, width=200))
    assert "already finished at step 4" in out.getvalue()
    assert _files(run_dir) == files
    assert (again.steps, again.tokens_seen) == (done.steps, done.tokens_seen)
    assert {k: q.cross_entropy for k, q in again.after.items()} == {k: q.cross_entropy for k, q in done.after.items()}


def test_a_refused_start_leaves_nothing_behind(tiny_base_model, corpus, tmp_path, run_cli, monkeypatch):
    run_dir = tmp_path / "run"
    args = [f"{key}={value}" for key, value in _flat_overrides(tune_cfg(tiny_base_model, corpus, run_dir))]
    args = [a for a in args if not a.startswith("train.steps=")] + ["train.steps=2"]
    code, _, err = run_cli("tune", *args, f"train.init_from={tmp_path / 'nonexistent'}")
    assert code == 2 and "run dir not found" in err
    assert not run_dir.exists()

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no W&B login
    refusals = {
        f"model.checkpoint_dir={tmp_path / 'no-model'}": "no-model",
        f"data.path={tmp_path / 'no-data.txt'}": "no-data.txt",
        "exits.layers=[2,9]": "9",
        "loss.exit_weights=[1,2]": "exit_weights",
        "model.dtype=float16": "float16",
        "logger.kind=wandb": "W&B login",  # refused in the trainer, after the run dir was made
    }
    for override, message in refusals.items():
        extra = ["logger.mode=online"] if override.startswith("logger") else []
        with pytest.raises(EetuneError, match=message):
            tune.run(tune_cfg(tiny_base_model, corpus, run_dir, "train.steps=2", override, *extra))
        assert not run_dir.exists(), override
    # A run dir that existed (empty) before a refusal is kept, and left empty.
    run_dir.mkdir()
    with pytest.raises(EetuneError, match="W&B login"):
        tune.run(tune_cfg(tiny_base_model, corpus, run_dir, "train.steps=2", "logger.kind=wandb", "logger.mode=online"))
    assert run_dir.is_dir() and not any(run_dir.iterdir())

    code, _, err = run_cli("tune", *args)
    assert code == 0, err
    assert (run_dir / "manifest.json").is_file()
    code, _, err = run_cli("tune", *args, "train.steps=3", "resume=true")
    assert code == 0, err
    assert json.loads((run_dir / "manifest.json").read_text())["tune"]["steps"] == 3


def test_exits_from_another_base_model_are_refused_naming_both_checkpoint_dirs(tiny_base_model, corpus, tmp_path):
    source = tmp_path / "source"
    tune.run(tune_cfg(tiny_base_model, corpus, source, "train.steps=1"))
    other = write_tiny_checkpoint(
        get_model_entry("smollm2_135m"), tmp_path / "other-checkpoint", seed=1, num_hidden_layers=4,
        rope_theta=100_000.0, rope_scaling=None, tie_word_embeddings=True, max_position_embeddings=2048,
    )
    cfg = tune_cfg(tiny_base_model, corpus, tmp_path / "next", f"train.init_from={source}",
                   f"model.checkpoint_dir={other}")
    with pytest.raises(EetuneError) as refused:
        tune.run(cfg)
    message = str(refused.value)
    assert f"from {tiny_base_model.checkpoint_dir} (fingerprint {tiny_base_model.fingerprint})" in message
    assert f"loaded from {other} has fingerprint" in message
    assert "\n" not in message and not (tmp_path / "next").exists()

    # A manifest written before checkpoint_dir was recorded: still loads, and still refuses clearly.
    manifest = json.loads((source / "manifest.json").read_text())
    del manifest["base_model"]["checkpoint_dir"]
    (source / "manifest.json").write_text(json.dumps(manifest))
    assert load_exits(source, tiny_base_model.model, tiny_base_model.fingerprint).exit_layers == [1, 2, 3]
    with pytest.raises(EetuneError, match=f"does not record .*loaded from {other}"):
        tune.run(cfg)


def test_confidence_estimators_train_and_are_saved_with_the_exits(tiny_base_model, corpus, tmp_path):
    run_dir = tmp_path / "run"
    tune.run(tune_cfg(tiny_base_model, corpus, run_dir, "exits.confidence=mlp", "train.steps=6"))
    state = exit_state(run_dir)
    assert any(key.startswith("1.confidence.net.") for key in state)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    bce = [r["confidence_bce/exit_2"] for r in records if "confidence_bce/exit_2" in r]
    assert len(bce) == 6 and all(0 <= value < 5 for value in bce)
    model = load_exits(run_dir, tiny_base_model.model, tiny_base_model.fingerprint)
    estimator = model.exit(1).confidence
    assert estimator is not None
    torch.testing.assert_close(estimator.net[0].weight, state["1.confidence.net.0.weight"])


def test_wandb_offline_run_holds_the_logged_metrics(tiny_base_model, corpus, tmp_path, monkeypatch, read_wandb_records):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    tune.run(tune_cfg(tiny_base_model, corpus, run_dir, "logger.kind=wandb", "logger.mode=offline", "train.steps=3"))
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    steps_with: dict[str, set[int]] = {}
    summary_keys: set[str] = set()
    for record in read_wandb_records(offline[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            for key in items:
                steps_with.setdefault(key, set()).add(int(items["_step"]))
        elif kind == "summary":
            summary_keys |= {item.key or "/".join(item.nested_key) for item in record.summary.update}
    assert steps_with["ce/exit_2"] == {1, 2, 3}
    assert steps_with["heldout_ce/exit_3"] == {0, 3}
    assert "heldout_agreement/exit_1" in summary_keys


def test_schedules_match_hand_computed_values():
    # Warmup 2 of 11 steps, cosine to 10%: step 0 -> 0.5, 1 -> 1.0, mid-decay -> 0.55, last -> 0.1.
    kwargs = dict(total_steps=11, warmup_steps=2, decay="cosine", min_ratio=0.1)
    assert lr_factor(0, **kwargs) == pytest.approx(0.5)
    assert lr_factor(1, **kwargs) == pytest.approx(1.0)
    assert lr_factor(6, **kwargs) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(10, **kwargs) == pytest.approx(0.1)
    assert lr_factor(6, **{**kwargs, "decay": "linear"}) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(3, **{**kwargs, "decay": "linear"}) == pytest.approx(0.1 + 0.9 * (1 - 1 / 8))
    # Exit weights warmed up over 4 steps: linear 0.25/0.5/.../1 x base; cosine (1 - cos(pi p)) / 2.
    assert exit_weight(2.0, 0, weighting="linear", warmup_steps=4) == pytest.approx(0.5)
    assert exit_weight(2.0, 9, weighting="linear", warmup_steps=4) == pytest.approx(2.0)
    assert exit_weight(2.0, 1, weighting="cosine", warmup_steps=4) == pytest.approx(1.0)
    assert exit_weight(2.0, 0, weighting="constant", warmup_steps=4) == 2.0
    assert exit_weight(2.0, 0, weighting="dynamic", warmup_steps=4) == 2.0


def test_flat_stop_counts_evaluations_without_relative_gain():
    stop = FlatStop(patience=2, min_delta=0.1)
    assert not stop.update({8: 10.0, 16: 8.0})  # first values always count as a gain
    assert not stop.update({8: 9.5, 16: 7.9})  # 5% and 1.25% below best: no gain (1 of 2)
    assert stop.best == {"8": 9.5, "16": 7.9} and stop.evals_without_gain == 1
    assert not stop.update({8: 8.0, 16: 8.5})  # 8.0 < 9.5 * 0.9: a gain resets the count
    assert not stop.update({8: 7.9, 16: 7.8})
    assert stop.update({8: 7.95, 16: 7.9})  # second evaluation in a row without a gain
    restored = FlatStop(patience=2, min_delta=0.1)
    restored.load_state_dict(stop.state_dict())
    assert restored == stop
    assert not FlatStop(patience=0, min_delta=0.1).update({8: 1.0})


def test_tune_stops_when_heldout_losses_flatten(tiny_base_model, corpus, tmp_path):
    # min_delta 0.99: no evaluation can count as a gain, so patience 2 stops at the second one.
    run_dir = tmp_path / "run"
    result = tune.run(
        tune_cfg(
            tiny_base_model, corpus, run_dir, "train.steps=40", "train.eval_every=3",
            "train.flat_patience=2", "train.flat_min_delta=0.99", "train.log_every=5",
        )
    )
    assert result.steps == 6
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["tune"]["steps"] == 6 and manifest["tune"]["stopped_flat"] is True
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    heldout_steps = [m["step"] for m in logged if "heldout_ce/exit_1" in m]
    assert heldout_steps[:3] == [0, 3, 6]  # evaluations are logged even off the log_every grid

    # Flat-stopped is finished: resumed as it is, nothing happens; a larger train.steps extends it
    # with another flat_patience evaluations (it stops at step 12, not at the next one, 9).
    files = _files(run_dir)
    flat = ("train.eval_every=3", "train.flat_patience=2", "train.flat_min_delta=0.99", "train.log_every=5")
    assert tune.run(tune_cfg(tiny_base_model, corpus, run_dir, "train.steps=40", *flat, "resume=true")).steps == 6
    assert _files(run_dir) == files
    assert tune.run(tune_cfg(tiny_base_model, corpus, run_dir, "train.steps=50", *flat, "resume=true")).steps == 12
    assert json.loads((run_dir / "manifest.json").read_text())["tune"]["stopped_flat"] is True
    with pytest.raises(EetuneError, match="train.eval_every"):
        tune.run(tune_cfg(tiny_base_model, corpus, tmp_path / "bad", "train.flat_patience=2"))
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_changed_keys_names_every_differing_leaf_once():
    from eetune.config.diff import changed_keys

    old = {"optim": {"lr": 0.01, "betas": [0.9, 0.95]}, "train": {"steps": 4}, "seed": 0, "gone": 1}
    new = {"optim": {"lr": 0.02, "betas": [0.9, 0.95]}, "train": {"steps": 8}, "seed": 0, "added": {"x": 2}}
    assert changed_keys(old, new) == ["added.x", "gone", "optim.lr", "train.steps"]
    assert changed_keys(old, new, ignore=("train.steps", "gone", "added.x")) == ["optim.lr"]
    assert changed_keys(old, old) == []
