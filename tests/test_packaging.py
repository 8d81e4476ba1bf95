"""A built wheel carries the recipes and config groups, and the CLI it installs finds them.

The wheel is built with pip (as `pip install .` does) and unpacked into a directory that stands
in for site-packages; the CLI then runs from another directory with that copy first on the path,
so nothing is read from the checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from eetune.config import config_groups, list_recipes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unpacked wheel: what `pip install .` puts in site-packages."""
    dist = tmp_path_factory.mktemp("dist")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("eetune-*.whl")
    site = tmp_path_factory.mktemp("site-packages")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def test_wheel_holds_every_recipe_and_config_group(installed: Path) -> None:
    package = installed / "eetune"
    for name in list_recipes():
        assert (package / "recipes" / f"{name}.yaml").is_file(), name
    for group, options in config_groups().items():
        for option in options:
            assert (package / "configs" / group / f"{option}.yaml").is_file(), (group, option)
    # Real files, not links back into a checkout.
    assert not (package / "recipes").is_symlink() and not (package / "configs").is_symlink()


def test_installed_cli_lists_recipes_and_augments_from_anywhere(installed, tiny_base_model, tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(installed)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def eetune(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "eetune", *args], capture_output=True, text=True,
                              env=env, cwd=elsewhere, timeout=300)

    where = subprocess.run([sys.executable, "-c", "import eetune; print(eetune.__file__)"],
                           capture_output=True, text=True, env=env, cwd=elsewhere)
    assert Path(where.stdout.strip()).is_relative_to(installed), where.stdout

    listed = eetune("recipes", "list")
    assert listed.returncode == 0, listed.stderr
    for name in list_recipes():
        assert name in listed.stdout

    run_dir = tmp_path / "aug"
    augmented = eetune(
        "augment", "recipe=smollm2_135m", f"model.checkpoint_dir={tiny_base_model.checkpoint_dir}",
        "model.dtype=float32", "exits.layers=[1,2]", "data.seq_len=32", "data.heldout_sequences=2",
        f"run_dir={run_dir}",
    )
    assert augmented.returncode == 0, augmented.stderr[-3000:]
    assert (run_dir / "exits.safetensors").is_file() and (run_dir / "manifest.json").is_file()
