"""Tuning data: documents tokenised into one stream, split train/held-out, packed to `seq_len`.

The held-out split is the tail `data.heldout_fraction` of the token stream, so tuning never
sees the text exits are scored on. Train examples are non-overlapping windows: example k is
tokens [kL, (k+1)L) with labels = the next token of each position, or -100 where that next
token carries no loss (masked chat prompts); windows with no loss at all are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from eetune.data.encode import TokenStream, encode_documents
from eetune.data.sources import load_documents
from eetune.errors import EetuneError

IGNORE_INDEX = -100  # torch cross_entropy's default ignore_index


@dataclass
class TuningData:
    train_tokens: torch.Tensor  # [n, seq_len] long
    train_labels: torch.Tensor  # [n, seq_len] long: next-token ids, IGNORE_INDEX where no loss
    heldout: TokenStream  # the tail of the stream, never trained on
    seq_len: int
    num_documents: int

    @property
    def num_examples(self) -> int:
        return len(self.train_tokens)

    @property
    def num_train_tokens(self) -> int:
        return self.train_tokens.numel()

    @property
    def num_loss_tokens(self) -> int:
        return int((self.train_labels != IGNORE_INDEX).sum())

    def heldout_batch(self, max_sequences: int) -> torch.Tensor:
        """[<= max_sequences, seq_len] held-out token windows (what exits are scored on)."""
        return pack(self.heldout.ids, self.seq_len, max_sequences, what="the held-out split")


def check_seq_len(seq_len: int, max_seq_len: int | None) -> None:
    if seq_len < 2:
        raise EetuneError(f"data.seq_len={seq_len} is too short: need at least 2 tokens")
    if max_seq_len is not None and seq_len > max_seq_len:
        raise EetuneError(
            f"data.seq_len={seq_len} is longer than the model supports (model.max_seq_len={max_seq_len})"
        )


def split_stream(stream: TokenStream, heldout_fraction: float) -> tuple[TokenStream, TokenStream]:
    """(train, held-out): the held-out part is the last `heldout_fraction` of the tokens."""
    if not 0.0 < heldout_fraction < 1.0:
        raise EetuneError(f"data.heldout_fraction={heldout_fraction} must be in (0, 1)")
    cut = int(len(stream) * (1.0 - heldout_fraction))
    return stream[:cut], stream[cut:]


def pack(stream: torch.Tensor, seq_len: int, max_sequences: int | None = None, *, what: str = "the data") -> torch.Tensor:
    """[n, seq_len] non-overlapping windows of a 1-D stream (the ragged tail is dropped)."""
    n = len(stream) // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise EetuneError(
            f"{what} has {len(stream)} tokens, not enough for one sequence of data.seq_len={seq_len}: "
            "use more data, a shorter data.seq_len or a larger data.heldout_fraction"
        )
    return stream[: n * seq_len].view(n, seq_len)


def pack_examples(stream: TokenStream, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels), each [n, seq_len]; labels[k, i] is the token after tokens[k, i].

    A window's last label is the first token of the next window, so every token but the
    first is a target exactly once.
    """
    n = (len(stream) - 1) // seq_len
    if n <= 0:
        raise EetuneError(
            f"the training split has {len(stream)} tokens, not enough for one sequence of "
            f"data.seq_len={seq_len}: use more data or a shorter data.seq_len"
        )
    tokens = stream.ids[: n * seq_len].view(n, seq_len)
    targets = stream.ids[1 : n * seq_len + 1].view(n, seq_len)
    trainable = stream.trainable[1 : n * seq_len + 1].view(n, seq_len)
    labels = torch.where(trainable, targets, torch.full_like(targets, IGNORE_INDEX))
    # A window without a single target (e.g. inside a long masked prompt) would give 0/0 loss.
    keep = trainable.any(dim=1)
    if not bool(keep.any()):
        raise EetuneError(
            "no training token carries loss: the chat data has no assistant turns "
            "(add some, or set data.train_on_prompt=true)"
        )
    return tokens[keep].contiguous(), labels[keep].contiguous()


def encode_corpus(data_cfg: Any, tokenizer: Any) -> tuple[TokenStream, int]:
    """The whole corpus of a `data` section as one token stream, and its document count."""
    documents = load_documents(data_cfg)
    if not documents or all(doc.text is not None and not doc.text.strip() for doc in documents):
        raise EetuneError(f"the dataset is empty: {data_cfg.source} data holds no text")
    return encode_documents(documents, tokenizer, train_on_prompt=data_cfg.train_on_prompt), len(documents)


def load_tuning_data(data_cfg: Any, tokenizer: Any, *, max_seq_len: int | None = None) -> TuningData:
    """Train examples and the held-out stream of a `data` config section."""
    check_seq_len(data_cfg.seq_len, max_seq_len)
    stream, num_documents = encode_corpus(data_cfg, tokenizer)
    train, heldout = split_stream(stream, data_cfg.heldout_fraction)
    tokens, labels = pack_examples(train, data_cfg.seq_len)
    return TuningData(tokens, labels, heldout, data_cfg.seq_len, num_documents)


def heldout_batch(data_cfg: Any, tokenizer: Any, *, max_seq_len: int | None = None) -> torch.Tensor:
    """The held-out sequences exits are scored on: [data.heldout_sequences, data.seq_len]."""
    check_seq_len(data_cfg.seq_len, max_seq_len)
    stream, _ = encode_corpus(data_cfg, tokenizer)
    _, heldout = split_stream(stream, data_cfg.heldout_fraction)
    return pack(heldout.ids, data_cfg.seq_len, data_cfg.heldout_sequences, what="the held-out split")
