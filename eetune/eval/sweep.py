"""The threshold sweep: every decoding setting through the real engine, side by side.

Each prompt is decoded under every setting before the next prompt starts (in an order shuffled
per prompt with `seed`), so slow drift in the machine's load spreads over all settings instead
of biasing whichever ran last or right after the full model. Quality is measured against the
full model's greedy output for the same prompt.

With batch_size B > 1 the prompts go in chunks of B: each chunk is decoded under every setting
(in an order shuffled per chunk) before the next chunk starts; `full` and `early_exit` decode
the chunk together (Engine.generate_batch, lock step), self_speculative one prompt at a time.
Every prompt's tokens, exit layers and text equal batch 1's (float32). A batch's decode time
and head calls are shared by its rows: each Output keeps its share of the time (in proportion
to the tokens it decoded) and of the head calls (in proportion to its tokens), so the sums over
a setting, and so tokens/s and head calls per token, are the batch's totals. Tokens/s is then
the batch's throughput, and the speedup's standard error comes from per-chunk speedups.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from eetune.errors import EetuneError
from eetune.eval.text_metrics import rouge_l, token_agreement
from eetune.infer.engine import DecodeResult, DecodeSettings, Engine, exit_settings
from eetune.infer.policy import POLICIES, describe_thresholds, settings_thresholds

if TYPE_CHECKING:
    from rich.console import Console

    from eetune.config.schema import EetuneConfig
    from eetune.exits import EarlyExitModel


@dataclass(frozen=True)
class Setting:
    """One decoding configuration of the sweep."""

    mode: str  # full | early_exit | self_speculative
    threshold: float = 1.0
    confidence: str = "max_prob"
    draft_exit: int | None = None
    draft_len: int = 4
    # One threshold per exit (shallowest first) in place of `threshold`: eetune.eval.per_exit.
    exit_thresholds: tuple[float, ...] | None = None

    @property
    def name(self) -> str:
        if self.mode == "early_exit":
            return f"{self.confidence}@{describe_thresholds(settings_thresholds(self))}"
        if self.mode == "self_speculative":
            return f"self_speculative(k={self.draft_len})"
        return "full"

    def decode_settings(self, max_new_tokens: int, stop_ids: frozenset[int]) -> DecodeSettings:
        return exit_settings(self, max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=stop_ids)


@dataclass
class Prompt:
    """A generation prompt: its token ids and where it came from (task name, item index)."""

    ids: list[int]
    task: str
    index: int


@dataclass
class Output:
    result: DecodeResult
    text: str
    # Rows put through a vocabulary head (exits and final) while decoding it; in a batch, the
    # batch's count shared by its rows in proportion to their tokens.
    head_calls: float
    # Its share of its batch's decode time (result.decode_s is the whole batch's, as the engine
    # reports it for every row); None: it was decoded alone, and result.decode_s is its own.
    decode_s: float | None = None
    # The chunk of prompts it was decoded with (speedup errors are per chunk); None: its own.
    chunk: int | None = None

    @property
    def time_s(self) -> float:
        """Decode time attributed to this output."""
        return self.result.decode_s if self.decode_s is None else self.decode_s


@dataclass
class SweepRow:
    setting: Setting
    outputs: list[Output] = field(default_factory=list)
    # filled by `summarise`:
    tokens_per_s: float = 0.0
    speedup: float = 1.0
    speedup_se: float = 0.0  # standard error of the mean per-prompt speedup (0 with < 2 prompts)
    mean_layers: float = 0.0
    head_calls_per_token: float = 0.0
    token_agreement: float = 1.0
    rouge_l_vs_full: float = 1.0
    acceptance_rate: float | None = None
    exit_counts: dict[int, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "setting": self.setting.name,
            "mode": self.setting.mode,
            "threshold": self.setting.threshold if self.setting.exit_thresholds is None else None,
            "exit_thresholds": None if self.setting.exit_thresholds is None else list(self.setting.exit_thresholds),
            "confidence": self.setting.confidence if self.setting.mode == "early_exit" else None,
            "tokens_per_s": self.tokens_per_s,
            "speedup": self.speedup,
            "speedup_se": self.speedup_se,
            "mean_layers": self.mean_layers,
            "head_calls_per_token": self.head_calls_per_token,
            "token_agreement": self.token_agreement,
            "rouge_l_vs_full": self.rouge_l_vs_full,
            "acceptance_rate": self.acceptance_rate,
            "exit_counts": {str(layer): n for layer, n in sorted(self.exit_counts.items())},
            "tokens": sum(len(o.result.tokens) for o in self.outputs),
        }


def run_sweep(
    engine: Engine,
    prompts: Sequence[Prompt],
    settings: Sequence[Setting],
    *,
    max_new_tokens: int,
    stop_ids: frozenset[int],
    decode: Callable[[list[int]], str],
    advance: Callable[[], None] | None = None,
    seed: int = 0,
    batch_size: int = 1,
) -> list[SweepRow]:
    """Decode every prompt under every setting (settings[0] must be `full`); `advance` ticks a
    progress bar once per prompt and setting. batch_size > 1 decodes `full` and `early_exit` in
    batches (the engine's max_batch_size must allow it); see the module docstring."""
    if not settings or settings[0].mode != "full":
        raise ValueError("the first setting of a sweep must be the full model (the reference)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = [SweepRow(setting) for setting in settings]
    chunks = [list(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    # Warm up allocator and kernels so the first timed setting is not penalised.
    if prompts:
        for setting in dict.fromkeys([settings[0], settings[-1]]):  # in order: every rank of a mesh alike
            warm = setting.decode_settings(min(4, max_new_tokens), stop_ids)
            engine.generate(prompts[0].ids, warm)
            if len(chunks[0]) > 1 and setting.mode != "self_speculative":
                engine.generate_batch([p.ids for p in chunks[0]], warm)
    order = random.Random(seed)
    for index, chunk in enumerate(chunks):
        for row in order.sample(rows, len(rows)):
            for output in _decode_chunk(engine, chunk, row.setting.decode_settings(max_new_tokens, stop_ids), decode):
                output.chunk = index
                row.outputs.append(output)
                if advance is not None:
                    advance()
    for row in rows:
        summarise(row, rows[0])
    return rows


def _decode_chunk(
    engine: Engine, chunk: list[Prompt], settings: DecodeSettings, decode: Callable[[list[int]], str]
) -> list[Output]:
    """One chunk of prompts under one setting: together where the mode allows, else one by one."""
    if len(chunk) == 1 or settings.mode == "self_speculative":
        outputs = []
        for prompt in chunk:
            before = sum(engine.head_calls.values())
            result = engine.generate(prompt.ids, settings)
            outputs.append(Output(result, decode(result.tokens), sum(engine.head_calls.values()) - before))
        return outputs
    before = sum(engine.head_calls.values())
    results = engine.generate_batch([p.ids for p in chunk], settings)
    calls = sum(engine.head_calls.values()) - before
    decode_s = max(r.decode_s for r in results)  # every row reports the batch's time
    tokens = [len(r.tokens) for r in results]
    decoded = [max(n - 1, 0) for n in tokens]
    return [
        Output(r, decode(r.tokens), calls * _share(tokens, i), decode_s * _share(decoded, i))
        for i, r in enumerate(results)
    ]


def _share(weights: list[int], i: int) -> float:
    """Row i's fraction of a batch total, in proportion to weights (equal shares if they are all 0)."""
    total = sum(weights)
    return weights[i] / total if total else 1.0 / len(weights)


def summarise(row: SweepRow, full: SweepRow) -> None:
    """Speed, depth and agreement with the full model's outputs (prompt by prompt)."""
    results = [o.result for o in row.outputs]
    decoded = sum(max(len(r.tokens) - 1, 0) for r in results)
    decode_s = sum(o.time_s for o in row.outputs)
    row.tokens_per_s = decoded / decode_s if decode_s > 0 else 0.0
    exit_layers = [layer for r in results for layer in r.exit_layers]
    n_tokens = max(len(exit_layers), 1)
    # Layer calls, as the engine counts them, summed over prompts: per-token mean, token-weighted.
    row.mean_layers = sum(r.mean_layers * len(r.tokens) for r in results) / n_tokens
    row.head_calls_per_token = sum(o.head_calls for o in row.outputs) / n_tokens
    row.exit_counts = dict(Counter(exit_layers))
    pairs = list(zip(row.outputs, full.outputs))
    if pairs:
        row.token_agreement = sum(token_agreement(o.result.tokens, f.result.tokens) for o, f in pairs) / len(pairs)
        row.rouge_l_vs_full = sum(_rouge_or_match(o.text, f.text) for o, f in pairs) / len(pairs)
    drafted = sum(r.draft_tokens for r in results)
    row.acceptance_rate = sum(r.accepted_tokens for r in results) / drafted if drafted else None
    if row is not full:
        row.speedup = row.tokens_per_s / full.tokens_per_s if full.tokens_per_s > 0 else 0.0
        row.speedup_se = _speedup_se(row.outputs, full.outputs)


def _speedup_se(outputs: Sequence[Output], full: Sequence[Output]) -> float:
    """Standard error of the mean of per-chunk speedups (per prompt at batch 1): how far timing
    noise and the choice of prompts can move the measured speedup."""
    mine, theirs = _chunk_rates(outputs), _chunk_rates(full)
    ratios = [rate / theirs[key] for key, rate in mine.items() if theirs.get(key, 0.0) > 0]
    if len(ratios) < 2:
        return 0.0
    mean = sum(ratios) / len(ratios)
    return math.sqrt(sum((x - mean) ** 2 for x in ratios) / (len(ratios) - 1) / len(ratios))


def _chunk_rates(outputs: Sequence[Output]) -> dict[int, float]:
    """Decode tokens/s of each chunk of prompts with any decoded token and time."""
    totals: dict[int, list[float]] = {}
    for i, o in enumerate(outputs):
        total = totals.setdefault(i if o.chunk is None else o.chunk, [0.0, 0.0])
        total[0] += max(len(o.result.tokens) - 1, 0)
        total[1] += o.time_s
    return {key: tokens / seconds for key, (tokens, seconds) in totals.items() if tokens > 0 and seconds > 0}


def _rouge_or_match(text: str, reference: str) -> float:
    """ROUGE-L, except that two outputs without a single word compare by equality."""
    if not any(ch.isalnum() for ch in text + reference):
        return float(text == reference)
    return rouge_l(text, reference)


def sweep_settings(cfg: EetuneConfig, model: EarlyExitModel, console: Console, *, has_token_order: bool = False,
                   per_exit: dict[str, Sequence[Sequence[float]]] | None = None) -> list[Setting]:
    """full first, then each confidence policy at each threshold below 1.0 and at the per-exit
    thresholds `per_exit` gives it, then self-speculative."""
    per_exit = per_exit or {}
    e = cfg.eval
    settings = [Setting("full")]
    has_estimators = all(model.exit(layer).confidence is not None for layer in model.exit_layers)
    for confidence in dict.fromkeys(e.confidences):
        if POLICIES[confidence].needs_estimator and not has_estimators:
            console.print(f"[dim]eval: skipping confidence '{confidence}': these exits have no estimators "
                          "(tune with exits.confidence=linear|mlp)[/]")
            continue
        if POLICIES[confidence].needs_token_order and not has_token_order:
            console.print(f"[dim]eval: skipping confidence '{confidence}': the run dir has no token frequencies "
                          "(draft_vocab.safetensors, written by tune)[/]")
            continue
        for t in sorted({float(t) for t in e.thresholds if t < 1.0}, reverse=True):
            settings.append(Setting("early_exit", t, confidence))
        for thresholds in per_exit.get(confidence, ()):
            settings.append(Setting("early_exit", 1.0, confidence, exit_thresholds=tuple(thresholds)))
    if e.self_speculative:
        if e.draft_exit is not None and e.draft_exit not in model.exit_layers:
            raise EetuneError(f"eval.draft_exit={e.draft_exit} is not an exit of this run; exits are at {model.exit_layers}")
        settings.append(Setting("self_speculative", draft_exit=e.draft_exit, draft_len=e.draft_len))
    return settings
