"""Tiny random models of any family, saved as real HF checkpoint dirs, for tests and demos.

A tiny checkpoint goes through exactly the same loading path as a real one, so code tested on
it is tested on what users run. The tokenizer is byte-level with a 256-entry vocabulary that
covers any UTF-8 text: ids 0-2 are the ChatML specials (as in SmolLM2: bos=1, eos=2) and the
other 253 ids are every byte value except 0xFD-0xFF, which never occur in valid UTF-8.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torchtune.modules import TransformerDecoder
from transformers.convert_slow_tokenizer import bytes_to_unicode

from eetune.models.checkpoint import save_hf_checkpoint
from eetune.models.registry import ModelEntry, ModelFamily, resolve_family

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_VOCAB_SIZE = 256
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_hf_config(entry_or_family: ModelEntry | ModelFamily | str, **overrides: Any) -> dict[str, Any]:
    """The family's tiny config.json as a plain dict, with ``overrides`` applied."""
    tiny = resolve_family(entry_or_family).tiny_config
    config = {key: (dict(value) if isinstance(value, Mapping) else value) for key, value in tiny.items()}
    config.update(overrides)
    return config


def random_decoder(
    entry_or_family: ModelEntry | ModelFamily | str,
    hf_config: Mapping[str, Any],
    seed: int,
    max_seq_len: int = 256,
) -> TransformerDecoder:
    """A decoder with seeded random weights; norm scales are randomised too, so no weight is trivial."""
    family = resolve_family(entry_or_family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = family.build(hf_config, max_seq_len)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("scale"):
                    param.copy_(1.0 + 0.1 * torch.randn_like(param))
    return model


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level ChatML tokenizer with exactly ``TINY_VOCAB_SIZE`` ids (see module doc)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = bytes_to_unicode()
    vocab = {token: i for i, token in enumerate(TINY_SPECIAL_TOKENS)}
    for byte in range(0xFD):  # 0xFD-0xFF are never part of valid UTF-8
        vocab[byte_chars[byte]] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token=None,
        chat_template=CHATML_TEMPLATE,
    )


def write_tiny_checkpoint(
    entry_or_family: ModelEntry | ModelFamily | str,
    out_dir: Path,
    seed: int = 0,
    with_tokenizer: bool = True,
    **overrides: Any,
) -> Path:
    """Save a seeded tiny random model of the family (config + weights + tokenizer) at ``out_dir``."""
    config = tiny_hf_config(entry_or_family, **overrides)
    model = random_decoder(entry_or_family, config, seed)
    tokenizer = build_tiny_tokenizer() if with_tokenizer else None
    return save_hf_checkpoint(model, entry_or_family, config, Path(out_dir), tokenizer=tokenizer)
