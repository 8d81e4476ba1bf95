"""Threshold calibration: the fastest early-exit threshold that keeps agreement with the full model.

`eetune eval` measures every threshold through the engine, picks per confidence policy the
fastest one whose greedy-token agreement with the full model is at least the target, and
writes `<run_dir>/calibration.json`. `generate` and `serve` read it through
`load_calibrated_threshold` as their default threshold. The file names the exits it was
measured on (a SHA-256 of exits.safetensors): after the exits change it no longer applies.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from eetune.errors import EetuneError
from eetune.exits import EXITS_FILE
from eetune.rundir import atomic_write_json

CALIBRATION_FILE = "calibration.json"
FORMAT = "eetune.calibration/1"


@dataclass(frozen=True)
class Candidate:
    threshold: float
    agreement: float  # greedy-token agreement with the full model on the calibration prompts
    speedup: float  # measured decode tokens/s over the full model's


@dataclass(frozen=True)
class Calibration:
    confidence: str
    threshold: float
    agreement: float
    speedup: float
    target_agreement: float
    candidates: tuple[Candidate, ...]


def pick_threshold(confidence: str, candidates: Sequence[Candidate], target: float) -> Calibration:
    """The fastest candidate with agreement >= target; the full model (1.0) when none qualifies.

    Ties in speed go to the higher threshold (the more conservative one).
    """
    if not 0.0 < target <= 1.0:
        raise EetuneError(f"eval.target_agreement={target} must be in (0, 1]")
    full = Candidate(1.0, 1.0, 1.0)
    pool = [full, *(c for c in candidates if c.threshold < 1.0)]
    meeting = [c for c in pool if c.agreement >= target]
    best = max(meeting, key=lambda c: (c.speedup, c.threshold))
    return Calibration(confidence, best.threshold, best.agreement, best.speedup, target, tuple(pool))


def exits_digest(run_dir: str | Path) -> str:
    digest = hashlib.sha256()
    with open(Path(run_dir) / EXITS_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_calibration(run_dir: str | Path, calibrations: Sequence[Calibration], measured_on: dict[str, Any]) -> Path:
    """Record the calibrated thresholds in the run dir (atomically, replacing an older calibration)."""
    path = Path(run_dir) / CALIBRATION_FILE
    atomic_write_json(
        path,
        {
            "format": FORMAT,
            "exits_sha256": exits_digest(run_dir),
            "measured_on": measured_on,
            "thresholds": {c.confidence: asdict(c) for c in calibrations},
        },
    )
    return path


def read_calibration(run_dir: str | Path) -> dict[str, Any] | None:
    """The run dir's calibration, or None when it has none or it was made for other exits."""
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EetuneError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): delete it or rerun eetune eval") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise EetuneError(f"{path} is not an eetune calibration ({FORMAT}): delete it or rerun eetune eval")
    if not (Path(run_dir) / EXITS_FILE).is_file() or data.get("exits_sha256") != exits_digest(run_dir):
        return None
    return data


def load_calibrated_threshold(run_dir: str | Path, confidence: str = "max_prob") -> float | None:
    """The threshold `eetune eval` calibrated for this run's exits and policy, else None."""
    data = read_calibration(run_dir)
    if data is None:
        return None
    entry = data.get("thresholds", {}).get(confidence)
    return float(entry["threshold"]) if entry else None
