"""Prompts as token ids (raw, or turns in the tokenizer's chat template) and the ids that end a reply."""

from __future__ import annotations

from typing import TYPE_CHECKING

from eetune.errors import EetuneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def build_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool, system: str | None = None
) -> list[int]:
    """Token ids of a raw prompt, or of one user turn in the tokenizer's chat template."""
    if not chat:
        return tokenizer.encode(prompt, add_special_tokens=True)
    if not getattr(tokenizer, "chat_template", None):
        raise EetuneError("this tokenizer has no chat template: use generate.chat=false (--no-chat)")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return chat_prompt_ids(tokenizer, messages)


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation ({role, content} turns) in the chat template, opening the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise EetuneError("this tokenizer has no chat template: give a plain prompt instead of chat messages")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """EOS plus the chat end-of-turn token where the vocabulary has one."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.add(token_id)
    return ids
