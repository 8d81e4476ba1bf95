"""`eetune data distill`: a self-distillation corpus written by the base model itself.

Each prompt gets `distill.samples_per_prompt` continuations; the JSONL output feeds straight
back into tuning as `data=jsonl data.path=<out>`. Exits tuned on the model's own outputs learn
what the full model would say, which is exactly what early-exit decoding must reproduce.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from eetune.console import make_console
from eetune.data.sources import read_text_file
from eetune.errors import EetuneError
from eetune.infer.generate import generate
from eetune.rundir import atomic_write
from eetune.stages.common import load_base
from eetune.stages.generate import build_prompt_ids, stop_token_ids

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "prompts" / "distill_prompts.txt"
DEFAULT_OUT_NAME = "distill.jsonl"


def read_prompts(path: Path) -> list[str]:
    """Prompts from a .jsonl/.json file (a `prompt` field per line) or text (one per line)."""
    text = read_text_file(path, what="prompt")
    prompts = []
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line.strip())
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EetuneError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise EetuneError(f"{path}:{number}: expected an object with a non-empty string field 'prompt'")
        prompts.append(record["prompt"])
    if not prompts:
        raise EetuneError(f"{path} holds no prompts")
    return prompts


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The sampling seed of one continuation: fixed by (cfg.seed, prompt, sample), well mixed."""
    digest = hashlib.blake2b(f"eetune-distill:{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def distill_record(prompt: str, completion: str, chat: bool) -> dict[str, Any]:
    """A record `data=jsonl` reads back: chat turns, or the prompt and completion as one text."""
    if chat:
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}
    return {"text": prompt + completion}


def output_path(cfg: DictConfig) -> Path:
    out = Path(cfg.distill.out).expanduser() if cfg.distill.out else Path(cfg.run_dir) / DEFAULT_OUT_NAME
    if out.exists():
        raise EetuneError(f"{out} already exists: choose another distill.out=... (it is never overwritten)")
    return out


def check_distill_config(d: Any) -> None:
    if d.samples_per_prompt < 1:
        raise EetuneError(f"distill.samples_per_prompt={d.samples_per_prompt} must be >= 1")
    if d.max_new_tokens < 1:
        raise EetuneError(f"distill.max_new_tokens={d.max_new_tokens} must be >= 1")
    if d.temperature < 0:
        raise EetuneError(f"distill.temperature={d.temperature} must be >= 0 (0 = greedy)")
    if d.top_p is not None and not 0.0 < d.top_p <= 1.0:
        raise EetuneError(f"distill.top_p={d.top_p} must be in (0, 1]")


def run(cfg: DictConfig, console: Console | None = None) -> Path:
    """Generate the corpus and write it to `distill.out` (default `<run_dir>/distill.jsonl`)."""
    d = cfg.distill
    console = console or make_console()
    check_distill_config(d)
    prompts_path = Path(d.prompts).expanduser() if d.prompts else DEFAULT_PROMPTS
    prompts = read_prompts(prompts_path)
    out = output_path(cfg)

    base = load_base(cfg.model)
    tokenizer = base.tokenizer
    if tokenizer is None:
        raise EetuneError(f"model {base.name} has no tokenizer: distillation needs one to read prompts")
    stop_ids = stop_token_ids(tokenizer)
    total = len(prompts) * d.samples_per_prompt

    def write(tmp: Path) -> None:
        progress = Progress(
            TextColumn("[bold]distill[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("prompts"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        with tmp.open("w", encoding="utf-8") as f, progress:
            task = progress.add_task("prompts", total=len(prompts))
            for i, prompt in enumerate(prompts):
                prompt_ids = build_prompt_ids(tokenizer, prompt, d.chat)
                for j in range(d.samples_per_prompt):
                    result = generate(
                        base.model,
                        prompt_ids,
                        d.max_new_tokens,
                        temperature=d.temperature,
                        top_p=d.top_p,
                        stop_ids=stop_ids,
                        seed=sample_seed(cfg.seed, i, j),
                    )
                    completion = tokenizer.decode(result.tokens, skip_special_tokens=True)
                    f.write(json.dumps(distill_record(prompt, completion, d.chat), ensure_ascii=False) + "\n")
                progress.advance(task)
        if out.exists():  # appeared while we were generating: still never overwrite it
            raise EetuneError(f"{out} appeared while generating: not overwriting it; the corpus was discarded")

    atomic_write(out, write)
    console.print(f"wrote {total} records ({len(prompts)} prompts x {d.samples_per_prompt}) to {out}")
    return out
