"""scripts/ship_exits.py on a tiny tune: what a shipped folder records, and what it refuses."""

import gzip
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eetune.config import compose_config
from eetune.eval.heldout import heldout_quality
from eetune.exits import load_exits
from eetune.stages import tune

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import ship_exits  # noqa: E402


@pytest.fixture
def tuned(tiny_base_model, tmp_path) -> tuple[Path, Path]:
    """A 3-step tune of the tiny model on real English text, and that text as one gzip part."""
    from pydoc_data.topics import topics

    data = tmp_path / "corpus.txt"
    data.write_text(topics["assignment"][:6000])
    part = tmp_path / "part-000.txt.gz"
    part.write_bytes(gzip.compress(data.read_bytes()))
    run_dir = tmp_path / "run"
    tune.run(compose_config("tune", [
        f"model.checkpoint_dir={tiny_base_model.checkpoint_dir}", f"run_dir={run_dir}",
        "data=text", f"data.path={data}", "data.seq_len=64", "data.batch_size=4", "data.heldout_sequences=2",
        "exits.layers=[1,2,3]", "optim.lr=1e-2", "optim.warmup_steps=1", "train.steps=3",
    ]))
    return run_dir, part


def test_ship_records_the_run_and_the_shipped_weights_score_what_it_records(tuned, tiny_base_model, tmp_path,
                                                                           monkeypatch):
    run_dir, part = tuned
    monkeypatch.setattr(ship_exits, "BUILTIN_ROOT", tmp_path / "builtin")
    ship_exits.main(["--run-dir", str(run_dir), "--name", "tiny", "--data-parts", str(part), "--note", "test"])

    folder = tmp_path / "builtin" / "tiny"
    manifest = json.loads((folder / "manifest.json").read_text())
    shipped = manifest["shipped"]
    run_manifest = json.loads((run_dir / "manifest.json").read_text())
    assert shipped["steps"] == 3
    assert shipped["tokens_seen"] == run_manifest["tune"]["tokens_seen"] > 0
    assert [m["step"] for m in shipped["first_losses"]] == [1, 2, 3]
    assert shipped["data"]["rebuild_from"] == [str(part)]

    tensors = load_file(folder / "exits.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    heldout = load_file(folder / "heldout.safetensors")["tokens"]
    assert heldout.numel() == shipped["heldout_tokens"]
    model = load_exits(folder, tiny_base_model.model, tiny_base_model.fingerprint)
    quality = heldout_quality(model.eval(), heldout)
    for layer in model.exit_layers:
        recorded = shipped["heldout"][str(layer)]
        assert quality[layer].agreement == pytest.approx(recorded["agreement"], abs=1e-6)
        assert quality[layer].cross_entropy == pytest.approx(recorded["cross_entropy"], abs=1e-5)


def test_ship_refuses_parts_that_do_not_rebuild_the_data_and_writes_nothing(tuned, tmp_path, monkeypatch):
    run_dir, _ = tuned
    other = tmp_path / "other.gz"
    other.write_bytes(gzip.compress(b"not the tuning text"))
    monkeypatch.setattr(ship_exits, "BUILTIN_ROOT", tmp_path / "builtin")
    with pytest.raises(SystemExit, match="do not rebuild"):
        ship_exits.main(["--run-dir", str(run_dir), "--name", "tiny", "--data-parts", str(other)])
    assert not (tmp_path / "builtin").exists()
