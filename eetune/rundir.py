"""Run directories: atomic file writes and the provenance every manifest carries."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from eetune.errors import EetuneError

_REPO_ROOT = Path(__file__).resolve().parents[1]
# Tuned exits shipped inside the package, named `builtin:<name>` wherever a run dir is read.
BUILTIN_PREFIX = "builtin:"
BUILTIN_ROOT = Path(__file__).resolve().parent / "builtin"
_TRACKED_PACKAGES = ("eetune", "torch", "torchtune", "torchao", "transformers", "safetensors")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, then rename into place: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def new_run_dir(path: str | Path) -> Iterator[Path]:
    """Yield a staging dir that becomes `path` only if the body finishes.

    An existing non-empty `path` is never touched: the user picks another `run_dir`.
    """
    final = Path(path)
    if final.exists() and any(final.iterdir()):
        raise EetuneError(f"run dir {final} already exists and is not empty: choose another run_dir=...")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())
        if final.exists():
            final.rmdir()
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_revision() -> str | None:
    """The eetune checkout's commit (with '-dirty' if modified), or None outside git."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_REPO_ROOT, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}-dirty" if dirty else rev


CONFIG_FILE = "config.yaml"


def write_config(run_dir: Path, cfg: Any) -> None:
    """The run's composed config, resolved, as `<run_dir>/config.yaml`."""
    from omegaconf import OmegaConf

    # A typed config (dataclass) or a DictConfig: the same YAML.
    atomic_write_text(Path(run_dir) / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True))


def builtin_names() -> list[str]:
    """The shipped run dirs (`builtin:<name>`)."""
    if not BUILTIN_ROOT.is_dir():
        return []
    return sorted(p.name for p in BUILTIN_ROOT.iterdir() if (p / "manifest.json").is_file())


def resolve_run_dir(value: str | None) -> str | None:
    """A run dir to read from: `builtin:<name>` becomes the shipped one's path; anything else as given."""
    if value is None or not str(value).startswith(BUILTIN_PREFIX):
        return value
    name = str(value)[len(BUILTIN_PREFIX):]
    if name not in builtin_names():
        shipped = ", ".join(f"{BUILTIN_PREFIX}{n}" for n in builtin_names()) or "none"
        raise EetuneError(f"no shipped exits named {value!r}; shipped: {shipped}")
    return str(BUILTIN_ROOT / name)


def is_builtin(path: str | Path) -> bool:
    """Whether `path` is a shipped run dir (read-only: nothing is written into it)."""
    return Path(path).resolve().parent == BUILTIN_ROOT
