"""`eetune generate`: decode from a prompt or a chat message, streaming to the terminal."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, TextIO

from omegaconf import DictConfig
from rich.console import Console

from eetune.errors import EetuneError
from eetune.infer.generate import GenerationResult, generate
from eetune.stages.common import load_base


@dataclass
class GenerateResult:
    text: str
    generation: GenerationResult


def build_prompt_ids(tokenizer: Any, prompt: str, chat: bool, system: str | None = None) -> list[int]:
    """Token ids of a raw prompt, or of one user turn in the tokenizer's chat template."""
    if not chat:
        return tokenizer.encode(prompt, add_special_tokens=True)
    if not getattr(tokenizer, "chat_template", None):
        raise EetuneError("this tokenizer has no chat template: use generate.chat=false (--no-chat)")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def stop_token_ids(tokenizer: Any) -> set[int]:
    """EOS plus the chat end-of-turn token where the vocabulary has one."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.add(token_id)
    return ids


class TextStream:
    """Prints decoded text as tokens arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        self.tokenizer = tokenizer
        self.out = out
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)


def run(cfg: DictConfig, out: TextIO | None = None, console: Console | None = None) -> GenerateResult:
    gen = cfg.generate
    if not gen.prompt:
        raise EetuneError("no prompt: pass --prompt 'text' (or generate.prompt=...)")
    out = out or sys.stdout
    console = console or Console(stderr=True)
    base = load_base(cfg.model)
    tokenizer = base.tokenizer
    prompt_ids = build_prompt_ids(tokenizer, gen.prompt, gen.chat, gen.system)

    stream: Callable[[int], None] = TextStream(tokenizer, out)
    result = generate(
        base.model,
        prompt_ids,
        gen.max_new_tokens,
        temperature=gen.temperature,
        top_k=gen.top_k,
        top_p=gen.top_p,
        stop_ids=stop_token_ids(tokenizer),
        seed=gen.seed,
        on_token=stream,
    )
    out.write("\n")
    console.print(
        f"[dim]{len(result.tokens)} tokens, {result.tokens_per_s:.1f} tok/s decode, "
        f"prefill {result.prefill_s * 1000:.0f} ms ({result.prompt_len} prompt tokens), "
        f"stopped by {result.stopped_by}[/]"
    )
    text = tokenizer.decode(result.tokens, skip_special_tokens=True)
    return GenerateResult(text=text, generation=result)
