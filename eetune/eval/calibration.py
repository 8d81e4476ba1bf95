"""Threshold calibration: the fastest early-exit threshold that keeps agreement with the full model.

`eetune eval` measures every threshold through the engine, picks per confidence policy the
fastest one whose greedy-token agreement with the full model is at least the target, and
writes `<run_dir>/calibration.json`. `generate` and `serve` read it through
`load_calibrated_threshold` as their default threshold. The file names the exits it was
measured on (a SHA-256 of exits.safetensors): after the exits change it no longer applies.
It also records the dtype, device and engine mode (greedy, eval.batch_size) and how many
prompts and tokens it was measured on: speed depends on dtype and device, so a caller on
another dtype or device ignores it with a one-line warning. Files written before these were recorded are
used, with a warning: the agreement the threshold was chosen for hardly depends on them,
and the fallback 0.8 is measured on nothing.

Stability: measured speedups are noisy, so candidates whose speedups differ by less than
twice the standard error of their difference (from the per-prompt speedups) count as equally
fast, and the higher threshold wins; an early exit must beat the full model by that margin.
A lower threshold that made exactly the decisions of a higher one (same tokens, same exits)
did the same work: its timing differs only by noise, so it is never picked over the higher one.

Per-exit thresholds (eetune.eval.per_exit: one per exit, searched on held-out statistics) are
candidates too, but a global threshold wins every tie: one threshold per exit is picked only
where it is faster than every qualifying global threshold by more than noise. The file then
records `exit_thresholds` for the policy, and generate and serve decode with them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eetune.errors import EetuneError
from eetune.exits import EXITS_FILE
from eetune.infer.policy import Thresholds
from eetune.rundir import atomic_write_json

if TYPE_CHECKING:
    from eetune.config.schema import EetuneConfig
    from eetune.eval.sweep import Prompt, SweepRow

CALIBRATION_FILE = "calibration.json"
FORMAT = "eetune.calibration/1"


@dataclass(frozen=True)
class Candidate:
    threshold: float
    agreement: float  # greedy-token agreement with the full model on the calibration prompts
    speedup: float  # measured decode tokens/s over the full model's
    speedup_se: float = 0.0  # standard error of the speedup over the prompts (0: unknown)
    # A digest of what the decode did (tokens and exit layers): equal for two thresholds, same work.
    decisions: str = ""
    # One threshold per exit, shallowest first, in place of `threshold` (None: one for all).
    exit_thresholds: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Calibration:
    confidence: str
    threshold: float
    agreement: float
    speedup: float
    target_agreement: float
    candidates: tuple[Candidate, ...]
    exit_thresholds: tuple[float, ...] | None = None  # where one threshold per exit won


def pick_threshold(confidence: str, candidates: Sequence[Candidate], target: float) -> Calibration:
    """The fastest candidate with agreement >= target; the full model (1.0) when none qualifies.

    Speeds within noise of the fastest (a difference under 2 standard errors) count as ties,
    and ties go to a global threshold over per-exit ones, then to the higher threshold (the more
    conservative one): two evals of the same run then pick the same threshold even though their
    timings differ. A candidate whose decisions equal a higher global threshold's is left out:
    it did the same work.
    """
    if not 0.0 < target <= 1.0:
        raise EetuneError(f"eval.target_agreement={target} must be in (0, 1]")
    full = Candidate(1.0, 1.0, 1.0)
    pool = [full, *(c for c in candidates if c.threshold < 1.0 or c.exit_thresholds is not None)]
    meeting = [c for c in pool if c.agreement >= target and not _repeats_a_higher_threshold(c, pool)]
    fastest = max(meeting, key=lambda c: (c.speedup, c.exit_thresholds is None, c.threshold))
    tied = [c for c in meeting if fastest.speedup - c.speedup <= 2.0 * math.hypot(c.speedup_se, fastest.speedup_se)]
    best = max(tied, key=lambda c: (c.exit_thresholds is None, c.threshold, c.speedup))
    return Calibration(confidence, best.threshold, best.agreement, best.speedup, target, tuple(pool), best.exit_thresholds)


def _repeats_a_higher_threshold(candidate: Candidate, pool: Sequence[Candidate]) -> bool:
    """It decided exactly as a higher global threshold did (a per-exit candidate: as any global one)."""
    return bool(candidate.decisions) and any(
        other.exit_thresholds is None and other.decisions == candidate.decisions
        and (candidate.exit_thresholds is not None or other.threshold > candidate.threshold)
        for other in pool if other is not candidate
    )


def exits_digest(run_dir: str | Path) -> str:
    digest = hashlib.sha256()
    with open(Path(run_dir) / EXITS_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_calibration(
    run_dir: str | Path, calibrations: Sequence[Calibration], measured_on: dict[str, Any], *,
    into: str | Path | None = None,
) -> Path:
    """Record the calibrated thresholds for the run dir's exits (atomically, replacing an older
    calibration) in the run dir, or in `into` when the run dir is read-only (shipped exits)."""
    path = Path(into if into is not None else run_dir) / CALIBRATION_FILE
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


def placement(module: Any) -> tuple[str, str]:
    """(dtype, device) a model computes in, as calibration.json records them: ("bfloat16", "cpu")."""
    weight = next(module.parameters())
    return str(weight.dtype).removeprefix("torch."), str(weight.device)


def _stderr_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def calibrated_thresholds(
    run_dir: str | Path, dtype: str | None = None, device: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Thresholds]:
    """confidence policy -> the threshold `eetune eval` calibrated for this run's exits (a tuple,
    one per exit, where per-exit thresholds won).

    Empty when there is none, when it was made for other exits, or when it was measured in
    another dtype or on another device than the given ones (then `warn` gets one line;
    None for either skips that check).
    """
    data = read_calibration(run_dir)
    if data is None:
        return {}
    warn = warn or _stderr_warning
    path = Path(run_dir) / CALIBRATION_FILE
    measured = data.get("measured_on") or {}
    wanted = {"dtype": dtype, "device": device}
    unknown = [key for key, value in wanted.items() if value is not None and key not in measured]
    other = [f"{key} {measured[key]} (here {value})" for key, value in wanted.items()
             if value is not None and key in measured and str(measured[key]) != value]
    if other:
        warn(f"ignoring {path}: measured on {', '.join(other)}; rerun eetune eval with this dtype and device")
        return {}
    if unknown:
        warn(f"{path} does not record its {' and '.join(unknown)} (made by an older eetune): using it; "
             "rerun eetune eval to record them")
    return {policy: _thresholds(entry) for policy, entry in (data.get("thresholds") or {}).items()}


def _thresholds(entry: dict[str, Any]) -> Thresholds:
    per_exit = entry.get("exit_thresholds")
    return float(entry["threshold"]) if per_exit is None else tuple(float(t) for t in per_exit)


def load_calibrated_threshold(
    run_dir: str | Path, confidence: str = "max_prob", dtype: str | None = None, device: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> Thresholds | None:
    """The threshold `eetune eval` calibrated for this run's exits and policy (see
    `calibrated_thresholds`), else None."""
    return calibrated_thresholds(run_dir, dtype, device, warn).get(confidence)


def run_calibration(
    run_dir: str | Path | None, model: Any, warn: Callable[[str], None] | None = None,
) -> dict[str, Thresholds]:
    """confidence policy -> the threshold `eetune eval` calibrated into `run_dir` for these exits
    in `model`'s dtype and on its device ; {} without a run dir."""
    if not run_dir:
        return {}
    return calibrated_thresholds(run_dir, *placement(model), warn)


def calibrations_from_sweep(cfg: EetuneConfig, rows: list[SweepRow]) -> list[Calibration]:
    """Per confidence policy swept, the fastest threshold meeting eval.target_agreement."""
    out = []
    for confidence in dict.fromkeys(cfg.eval.confidences):
        candidates = [
            Candidate(r.setting.threshold, r.token_agreement, r.speedup, r.speedup_se, _decisions(r),
                      r.setting.exit_thresholds)
            for r in rows if r.setting.mode == "early_exit" and r.setting.confidence == confidence
        ]
        if candidates:
            out.append(pick_threshold(confidence, candidates, cfg.eval.target_agreement))
    return out


def _decisions(row: SweepRow) -> str:
    done = [(list(o.result.tokens), list(o.result.exit_layers)) for o in row.outputs]
    return hashlib.sha256(json.dumps(done).encode()).hexdigest()[:16]


def calibration_source(
    cfg: EetuneConfig, prompts: list[Prompt], rows: list[SweepRow], dtype_device: tuple[str, str]
) -> dict[str, Any]:
    """What the calibration was measured on: `generate`/`serve` check dtype and device against it."""
    dtype, device = dtype_device
    return {
        "prompts": len(prompts), "tokens": sum(len(o.result.tokens) for o in rows[0].outputs),
        "tasks": sorted({p.task for p in prompts}), "max_new_tokens": cfg.eval.max_new_tokens,
        "chat": cfg.eval.chat, "model": cfg.model.name, "dtype": dtype, "device": device,
        "engine": {"decoding": "greedy", "batch_size": cfg.eval.batch_size}, "seed": cfg.seed,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
