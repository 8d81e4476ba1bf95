"""Token frequencies for FR-Spec drafting (Zhao et al. 2025): draft over the frequent tokens only.

A drafting exit pays for a vocabulary head at every draft token; on head-heavy models (the
SmolLM2 head weighs as much as 8 of its 30 layers) that alone can cost more than the layers it
skips. Restricting the draft head to the N most frequent tokens cuts that cost by vocab / N,
and speculative verification with the full head keeps the output exact. Frequencies come from
the tuning data; `tune` stores them in the run dir as `draft_vocab.safetensors`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from eetune.rundir import atomic_write

DRAFT_VOCAB_FILE = "draft_vocab.safetensors"


def count_tokens(token_ids: Tensor, vocab_size: int, ignore_index: int = -100) -> Tensor:
    """How often each id in [0, vocab_size) occurs in token_ids (ignore_index skipped): [vocab] int64."""
    ids = token_ids.flatten()
    ids = ids[ids != ignore_index]
    return torch.bincount(ids.to(torch.long).cpu(), minlength=vocab_size)[:vocab_size]


def token_order(counts: Tensor, always: tuple[int, ...] = ()) -> Tensor:
    """Token ids, most frequent first (ties: lower id first); `always` ids lead (e.g. stop tokens)."""
    counts = counts.to(torch.long).clone()
    if always:
        counts[list(always)] = counts.max() + 1
    # A stable sort by descending count keeps ties in id order.
    return torch.sort(-counts, stable=True).indices


def save_token_counts(run_dir: Path, counts: Tensor) -> None:
    tensors = {"counts": counts.to(torch.long).contiguous()}
    atomic_write(Path(run_dir) / DRAFT_VOCAB_FILE, lambda tmp: save_file(tensors, str(tmp)))


def load_token_order(run_dir: Path, always: tuple[int, ...] = ()) -> Tensor | None:
    """The run dir's token order, or None when it holds no frequencies (e.g. an augment run)."""
    path = Path(run_dir) / DRAFT_VOCAB_FILE
    if not path.is_file():
        return None
    return token_order(load_file(str(path))["counts"], always)
