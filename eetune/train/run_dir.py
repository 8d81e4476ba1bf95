"""A tune run's dir before training starts: config checks, new or resumed, finished or not."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterator

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from eetune.config.diff import changed_keys, flatten
from eetune.config.schema import EetuneConfig
from eetune.errors import EetuneError
from eetune.exits.checkpoint import MANIFEST_FILE
from eetune.rundir import CONFIG_FILE, write_config
from eetune.train.results import TuneResult, result_from_run_dir
from eetune.train.state import has_state, saved_step

# Keys that may differ between a run and its resumption (sections tuning never reads included,
# so runs saved before a section existed or changed its defaults still resume).
RESUME_FREE_KEYS = ("resume", "stage", "run_dir", "logger", "generate", "serve", "eval", "export", "plan")
# Launch settings (how the processes were started, not what they compute), and how long the run
# goes and how often it logs, evaluates and saves: a resume may extend a run or change its cadence.
RESUME_FREE_DOTTED = (
    "parallel.nproc_per_node", "parallel.backend",
    "train.steps", "train.flat_patience", "train.eval_every", "train.log_every", "train.checkpoint_every",
)


def check_run_dir(cfg: EetuneConfig, run_dir: Path) -> None:
    """A new run needs an absent or empty run dir; a resumed one, a tune run with a compatible config.
    Only reads: nothing is written until every start-up check has passed."""
    if cfg.resume:
        saved = run_dir / CONFIG_FILE
        if not saved.is_file() or not has_state(run_dir):
            raise EetuneError(f"resume=true but {run_dir} holds no interrupted tune run (config.yaml + state/)")
        check_same_config(OmegaConf.load(saved), cfg, run_dir)
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        raise EetuneError(
            f"run dir {run_dir} already exists and is not empty: choose another run_dir=..., "
            "or pass resume=true to continue an interrupted run there"
        )


def check_same_config(saved: EetuneConfig, current: EetuneConfig, run_dir: Path) -> None:
    """Refuse a resume whose config differs from the saved one beyond what a resume may change."""
    def comparable(c: EetuneConfig) -> dict:
        # A run saved before a schema field existed had that field at its default.
        with contextlib.suppress(OmegaConfBaseException):  # a key since removed: compare as saved
            c = OmegaConf.merge(OmegaConf.structured(EetuneConfig), c)
        container = OmegaConf.to_container(c, resolve=True)
        return {k: v for k, v in container.items() if k not in RESUME_FREE_KEYS}

    old, new = comparable(saved), comparable(current)
    changed = changed_keys(old, new, ignore=RESUME_FREE_DOTTED)
    if changed:
        flat_old, flat_new = flatten(old), flatten(new)
        differences = ", ".join(f"{key} was {flat_old.get(key)!r}, now {flat_new.get(key)!r}" for key in changed)
        raise EetuneError(
            f"cannot resume {run_dir}: its config differs ({differences}); only train.steps, train.flat_patience, "
            "train.eval_every, train.log_every, train.checkpoint_every and logger may change on resume: "
            "resume with the original settings or start a new run_dir"
        )


@contextlib.contextmanager
def started_run_dir(cfg: EetuneConfig, run_dir: Path) -> Iterator[None]:
    """Create a new run's dir and config.yaml (a resumed run's exist); if the start is refused
    (EetuneError) before any state is saved, remove what was created, so the corrected command
    can use the same run_dir."""
    if cfg.resume:
        yield
        return
    existed = run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, cfg)
    try:
        yield
    except EetuneError:
        if not has_state(run_dir):
            for path in [run_dir] if not existed else list(run_dir.iterdir()):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise


def finished_run(cfg: EetuneConfig, run_dir: Path) -> TuneResult | None:
    """resume=true on a run whose results are written at its saved step and which the config does
    not extend (train.steps not above the saved value): its result, read back; else None."""
    if not cfg.resume or not (run_dir / MANIFEST_FILE).is_file():
        return None
    tune = json.loads((run_dir / MANIFEST_FILE).read_text()).get("tune")
    if tune is None or tune["steps"] != saved_step(run_dir):
        return None  # the state went past the results: an extension was interrupted
    if cfg.train.steps > OmegaConf.load(run_dir / CONFIG_FILE).train.steps:
        return None
    return result_from_run_dir(run_dir)
