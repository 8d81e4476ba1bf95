"""`eetune generate`: decode from a prompt or a chat message, streaming to the terminal.

With `parallel.tp` > 1 (and `parallel.nproc_per_node`, or under torchrun) every rank decodes the
same request on its tensor-parallel slices; rank 0 prints.
"""

from __future__ import annotations

import io
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.text import Text

from eetune.config.schema import EetuneConfig
from eetune.console import make_console
from eetune.data.chat import build_prompt_ids, stop_token_ids
from eetune.errors import EetuneError
from eetune.exits.loading import load_model
from eetune.infer.draft_vocab import load_token_order
from eetune.infer.engine import DecodeResult, Engine, exit_settings
from eetune.eval.calibration import run_calibration
from eetune.infer.policy import describe_thresholds, resolve_thresholds
from eetune.rundir import resolve_run_dir


@dataclass
class GenerateResult:
    text: str
    result: DecodeResult


# Token colours by exit depth, shallow to deep; the full model's tokens stay unstyled.
_EXIT_STYLES = ("bold magenta", "bold red", "bold yellow", "bold green", "bold cyan", "bold blue")


class TextStream:
    """Writes decoded text as tokens arrive, holding back incomplete UTF-8 sequences.

    With a rich console, each piece of text is coloured by the exit its token left at.
    """

    def __init__(self, tokenizer: Any, out: TextIO, styles: dict[int, str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.out = out
        self.styles = styles
        self.console = Console(file=out, highlight=False, soft_wrap=True) if styles is not None else None
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, token: int, exit_layer: int | None = None) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        piece = text[self.printed :]
        if self.console is not None:
            self.console.print(Text(piece, style=self.styles.get(exit_layer, "")), end="")
        else:
            self.out.write(piece)
            self.out.flush()
        self.printed = len(text)


def run(cfg: EetuneConfig, out: TextIO | None = None, console: Console | None = None) -> GenerateResult | None:
    """Decode `generate.prompt`; None in a parent that re-launched itself under torchrun."""
    gen = cfg.generate
    gen.run_dir = resolve_run_dir(gen.run_dir)
    if not gen.prompt:
        raise EetuneError("no prompt: pass --prompt 'text' (or generate.prompt=...)")
    if gen.mode != "full" and not gen.run_dir:
        raise EetuneError(f"generate.mode={gen.mode} needs exits: pass --run-dir <augment or tune run dir>")
    out = out or sys.stdout
    console = console or make_console()
    from eetune.parallel import on_inference_mesh

    if not on_inference_mesh(cfg):
        return _generate(cfg, *load_model(gen.run_dir, **vars(cfg.model)), out, console)
    from eetune.parallel.launch import stage_ranks
    from eetune.parallel.load import build_inference_model

    with stage_ranks(cfg, console) as topology:
        if topology is None:
            return None
        base, model = build_inference_model(cfg.model, gen.run_dir, topology)
        if not topology.is_main:
            out, console = io.StringIO(), Console(quiet=True)
        return _generate(cfg, base, model, out, console)


def _generate(cfg: EetuneConfig, base: Any, model: Any, out: TextIO, console: Console) -> GenerateResult:
    gen = cfg.generate
    tokenizer = base.tokenizer
    prompt_ids = build_prompt_ids(tokenizer, gen.prompt, gen.chat, gen.system)
    threshold, exit_thresholds = decode_thresholds(gen, console, model)
    settings = exit_settings(
        gen,
        threshold=threshold,
        exit_thresholds=exit_thresholds,
        max_new_tokens=gen.max_new_tokens,
        temperature=gen.temperature,
        top_k=gen.top_k,
        top_p=gen.top_p,
        seed=gen.seed,
        stop_ids=frozenset(stop_token_ids(tokenizer)),
    )
    styles = (
        {layer: _EXIT_STYLES[i % len(_EXIT_STYLES)] for i, layer in enumerate(model.exit_layers)} if gen.color else None
    )
    stops = tuple(sorted(settings.stop_ids))
    token_order = load_token_order(Path(gen.run_dir), always=stops) if gen.run_dir else None
    engine = Engine(model, token_order=token_order)
    result = engine.generate(prompt_ids, settings, on_token=TextStream(tokenizer, out, styles))
    out.write("\n")
    console.print(f"[dim]{summary_line(result, model.num_layers)}[/]")
    text = tokenizer.decode(result.tokens, skip_special_tokens=True)
    return GenerateResult(text=text, result=result)


def decode_thresholds(gen: Any, console: Console, model: Any) -> tuple[float, tuple[float, ...] | None]:
    """(threshold, exit_thresholds): the explicit ones, else those `eetune eval` calibrated for the
    run's exits in `model`'s dtype and on its device, else DEFAULT_THRESHOLD
    (eetune.infer.policy.resolve_thresholds)."""
    if gen.threshold is not None or gen.exit_thresholds is not None:
        return resolve_thresholds(gen.threshold, gen.exit_thresholds, gen.confidence, {})

    def warn(message: str) -> None:
        if gen.mode == "early_exit":  # the only mode the threshold steers
            console.print(f"warning: {message}", markup=False)

    calibrated = run_calibration(gen.run_dir, model, warn)
    if gen.mode == "early_exit" and gen.confidence in calibrated:
        which = "threshold" if isinstance(calibrated[gen.confidence], float) else "exit thresholds"
        console.print(f"[dim]{which} {describe_thresholds(calibrated[gen.confidence])}: calibrated by eetune eval "
                      f"({gen.run_dir}/calibration.json)[/]")
    return resolve_thresholds(None, None, gen.confidence, calibrated)


def summary_line(result: DecodeResult, num_layers: int) -> str:
    """One line of decoding statistics: speed, depth, where tokens left, draft acceptance."""
    exits = Counter(result.exit_layers)
    where = ", ".join(f"{layer}: {count}" for layer, count in sorted(exits.items()))
    parts = [
        f"{len(result.tokens)} tokens",
        f"{result.tokens_per_s:.1f} tok/s decode",
        f"prefill {result.prefill_s * 1000:.0f} ms ({result.prompt_len} prompt tokens)",
        f"mean layers {result.mean_layers:.1f}/{num_layers}",
        f"exit layers {{{where}}}",
    ]
    if result.acceptance_rate is not None:
        parts.append(f"accepted {result.accepted_tokens}/{result.draft_tokens} drafts ({result.acceptance_rate:.0%})")
    parts.append(f"stopped by {result.stopped_by}")
    return ", ".join(parts)
