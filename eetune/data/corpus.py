"""Tuning data: documents tokenised into streams, split train/held-out, packed to `seq_len`.

The held-out split is never trained on. `data.heldout_by=tail` holds out the last
`data.heldout_fraction` of the token stream; `heldout_by=prompt` holds out whole documents,
chosen by a hash of their prompt (first user turn, or the text), so every sample drawn from a
prompt lands on the same side and held-out scores measure prompts the exits never saw.
Train examples are non-overlapping windows: example k is tokens [kL, (k+1)L) with labels =
the next token of each position, or -100 where that next token carries no loss (masked chat
prompts); windows with no loss at all are dropped. `data.mix` draws train windows from several
sources in proportion to their weights, and held-out windows likewise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from eetune.data.encode import ENCODE_CHUNK, StreamBuilder, TokenStream
from eetune.data.sources import Document, Source, load_documents, sources_of
from eetune.errors import EetuneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from eetune.config.schema import DataConfig

IGNORE_INDEX = -100  # torch cross_entropy's default ignore_index


@dataclass
class SourceSplit:
    """One source's tokens, split: what tuning sees and what scores the exits."""

    train: TokenStream
    heldout: TokenStream
    weight: float
    num_documents: int


@dataclass
class TuningData:
    train_tokens: torch.Tensor  # [n, seq_len] long
    train_labels: torch.Tensor  # [n, seq_len] long: next-token ids, IGNORE_INDEX where no loss
    heldout: list[tuple[TokenStream, float]]  # each source's held-out stream and weight, never trained on
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
        return heldout_windows(self.heldout, self.seq_len, max_sequences)


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


def heldout_key(doc: Document) -> str:
    """What decides a document's side under heldout_by=prompt: its first user turn, else its text."""
    if doc.messages is not None:
        users = [m.content for m in doc.messages if m.role == "user"]
        return users[0] if users else doc.messages[0].content
    return doc.text or ""


def is_heldout(doc: Document, fraction: float) -> bool:
    digest = hashlib.blake2b(heldout_key(doc).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def _check_not_empty(builders: Iterable[StreamBuilder], source: Source) -> None:
    if not any(b.has_text for b in builders):
        raise EetuneError(f"the dataset is empty: {source.name} data holds no text")


def _stream_into(documents: Iterable[Document], route: Callable[[Document], StreamBuilder]) -> None:
    """Feed each document to the builder `route` picks, ENCODE_CHUNK at a time (bounded memory)."""
    pending: dict[StreamBuilder, list[Document]] = {}
    for doc in documents:
        builder = route(doc)
        docs = pending.setdefault(builder, [])
        docs.append(doc)
        if len(docs) == ENCODE_CHUNK:
            builder.add(docs)
            pending[builder] = []
    for builder, docs in pending.items():
        builder.add(docs)


def encode_source(
    source: Source, tokenizer: PreTrainedTokenizerBase, *, train_on_prompt: bool
) -> tuple[TokenStream, int]:
    """A source's documents as one token stream, and its document count."""
    builder = StreamBuilder(tokenizer, train_on_prompt)
    _stream_into(load_documents(source), lambda doc: builder)
    _check_not_empty([builder], source)
    return builder.build(), builder.num_documents


def split_source(
    source: Source,
    tokenizer: PreTrainedTokenizerBase,
    *,
    train_on_prompt: bool,
    heldout_fraction: float,
    heldout_by: str,
) -> SourceSplit:
    """A source's train and held-out streams, split as `heldout_by` (`data.heldout_by`) says."""
    if not 0.0 < heldout_fraction < 1.0:
        raise EetuneError(f"data.heldout_fraction={heldout_fraction} must be in (0, 1)")
    if heldout_by == "tail":
        stream, num_documents = encode_source(source, tokenizer, train_on_prompt=train_on_prompt)
        train, heldout = split_stream(stream, heldout_fraction)
        return SourceSplit(train, heldout, source.weight, num_documents)
    train_b, heldout_b = StreamBuilder(tokenizer, train_on_prompt), StreamBuilder(tokenizer, train_on_prompt)
    _stream_into(load_documents(source), lambda doc: heldout_b if is_heldout(doc, heldout_fraction) else train_b)
    _check_not_empty([train_b, heldout_b], source)
    num_documents = train_b.num_documents + heldout_b.num_documents
    for builder, side in ((train_b, "train"), (heldout_b, "held-out")):
        if builder.num_documents == 0:
            raise EetuneError(
                f"{source.name}: no document falls in the {side} split with data.heldout_by=prompt and "
                f"data.heldout_fraction={heldout_fraction} ({num_documents} documents): "
                "use more documents, another heldout_fraction, or data.heldout_by=tail"
            )
    return SourceSplit(train_b.build(), heldout_b.build(), source.weight, num_documents)


def mix_examples(examples: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Train windows drawn from each source in proportion to its weight.

    The mix keeps the sources' total window count; a source asked for more windows than it
    has repeats them (in a fixed shuffled order), one asked for fewer gives a fixed subset.
    """
    if len(examples) == 1:
        return examples[0]
    total = sum(len(tokens) for tokens, _ in examples)
    weight_sum = sum(weights)
    tokens_out, labels_out = [], []
    for k, ((tokens, labels), weight) in enumerate(zip(examples, weights)):
        count = max(1, round(total * weight / weight_sum))
        order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(k))
        index = order.repeat(-(-count // len(tokens)))[:count]
        tokens_out.append(tokens[index])
        labels_out.append(labels[index])
    return torch.cat(tokens_out), torch.cat(labels_out)


def heldout_windows(parts: list[tuple[TokenStream, float]], seq_len: int, max_sequences: int) -> torch.Tensor:
    """[<= max_sequences, seq_len] held-out windows, shared among the sources by weight."""
    if len(parts) == 1:
        return pack(parts[0][0].ids, seq_len, max_sequences, what="the held-out split")
    weight_sum = sum(weight for _, weight in parts)
    shares = [max_sequences * weight / weight_sum for _, weight in parts]
    counts = [int(share) for share in shares]
    # Largest remainders get the sequences rounding left over.
    for k in sorted(range(len(parts)), key=lambda k: counts[k] - shares[k])[: max_sequences - sum(counts)]:
        counts[k] += 1
    windows = [pack(stream.ids, seq_len, count, what=f"the held-out split of data.mix[{k}]")
               for k, ((stream, _), count) in enumerate(zip(parts, counts)) if count > 0]
    return torch.cat(windows)


def encode_corpus(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[TokenStream, int]:
    """The whole corpus of a single-source `data` section as one token stream, and its document count."""
    (source,) = sources_of(data_cfg)
    return encode_source(source, tokenizer, train_on_prompt=data_cfg.train_on_prompt)


def _split_sources(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> list[SourceSplit]:
    return [
        split_source(source, tokenizer, train_on_prompt=data_cfg.train_on_prompt,
                     heldout_fraction=data_cfg.heldout_fraction, heldout_by=data_cfg.heldout_by)
        for source in sources_of(data_cfg)
    ]


def load_tuning_data(
    data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, max_seq_len: int | None = None
) -> TuningData:
    """Train examples and the held-out streams of a `data` config section."""
    check_seq_len(data_cfg.seq_len, max_seq_len)
    parts = _split_sources(data_cfg, tokenizer)
    tokens, labels = mix_examples([pack_examples(p.train, data_cfg.seq_len) for p in parts], [p.weight for p in parts])
    return TuningData(tokens, labels, [(p.heldout, p.weight) for p in parts], data_cfg.seq_len,
                      sum(p.num_documents for p in parts))


def heldout_batch(
    data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, max_seq_len: int | None = None
) -> torch.Tensor:
    """The held-out sequences exits are scored on: [data.heldout_sequences, data.seq_len]."""
    check_seq_len(data_cfg.seq_len, max_seq_len)
    parts = _split_sources(data_cfg, tokenizer)
    return heldout_windows([(p.heldout, p.weight) for p in parts], data_cfg.seq_len, data_cfg.heldout_sequences)
