"""A deterministic, resumable, endless batch iterator over packed train examples.

The order of epoch e depends only on (seed, e), so (epoch, position) is the whole state:
a run resumed from `state_dict()` sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from eetune.errors import EetuneError


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed per (seed, epoch); seed + epoch would make runs overlap."""
    digest = hashlib.blake2b(f"eetune-batches:{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class TrainBatches:
    """Batches {"tokens", "labels", "indices"} of `batch_size` examples, epoch after epoch.

    Each epoch is a permutation of all examples (seeded per epoch when `shuffle`), cut into
    `num_examples // batch_size` full batches; with shuffling the few left over differ per
    epoch, so none is skipped for good. `indices` are the examples' row numbers (stable ids,
    e.g. for caching per-example activations).
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if tokens.dim() != 2 or tokens.shape != labels.shape:
            raise EetuneError(
                f"tokens and labels must both be [examples, seq_len], got {tuple(tokens.shape)} and {tuple(labels.shape)}"
            )
        if batch_size < 1:
            raise EetuneError(f"data.batch_size={batch_size} must be >= 1")
        if len(tokens) < batch_size:
            raise EetuneError(
                f"the training split packs into {len(tokens)} sequences of data.seq_len={tokens.shape[1]}, "
                f"fewer than one batch of data.batch_size={batch_size}: use more data, "
                "a shorter data.seq_len or a smaller data.batch_size"
            )
        self.tokens = tokens
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0  # epoch of the next batch
        self.position = 0  # batches already taken from this epoch
        self._order: torch.Tensor | None = None

    @property
    def num_examples(self) -> int:
        return len(self.tokens)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Example indices in the order epoch `epoch` visits them."""
        if not self.shuffle:
            return torch.arange(self.num_examples)
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(self.num_examples, generator=generator)

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        start = self.position * self.batch_size
        indices = self._order[start : start + self.batch_size]
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
            self._order = None
        return {"tokens": self.tokens[indices], "labels": self.labels[indices], "indices": indices.clone()}

    def state_dict(self) -> dict[str, Any]:
        # The data's shape and the seed go along so a resume on different data fails loudly.
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "num_examples": self.num_examples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        current = self.state_dict()
        for key in ("seed", "shuffle", "batch_size", "num_examples"):
            if key in state and state[key] != current[key]:
                raise EetuneError(
                    f"cannot resume the data iterator: {key} was {state[key]} when saved and is {current[key]} now "
                    "(the data or data config changed)"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise EetuneError(f"cannot resume the data iterator: invalid state epoch={epoch} position={position}")
        self.epoch, self.position, self._order = epoch, position, None
