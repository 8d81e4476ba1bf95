"""Documents to one token stream, with a per-token flag saying whether it may be a loss target.

Documents are joined with EOS. Chat documents are rendered with the tokenizer's own chat
template; with `train_on_prompt=False` only assistant turns (their content and end-of-turn
token, not the role header) are targets, so the model is never trained to write the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch

from eetune.data.sources import Document, Message
from eetune.errors import EetuneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class TokenStream:
    ids: torch.Tensor  # [n] long
    trainable: torch.Tensor  # [n] bool: may this token be predicted with loss?

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: slice) -> TokenStream:
        return TokenStream(self.ids[index], self.trainable[index])


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: tuple[Message, ...], where: str, generation_prompt: bool = False
) -> str:
    turns = [{"role": m.role, "content": m.content} for m in messages]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raises TemplateError for conversations a template rejects
        raise EetuneError(f"{where}: the tokenizer's chat template rejects this conversation: {exc}") from None
    if not isinstance(text, str):
        raise EetuneError(f"{where}: the tokenizer's chat template did not render text")
    return text


def chat_segments(
    tokenizer: PreTrainedTokenizerBase, messages: tuple[Message, ...], where: str
) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant_output) pieces.

    Turn i's text is what rendering turns [:i+1] adds to rendering turns [:i]; an assistant
    turn's output starts after the generation prompt (`<|im_start|>assistant\\n` in ChatML).
    """
    full = _render(tokenizer, messages, where)
    segments: list[tuple[str, bool]] = []
    done = 0  # characters of `full` already assigned to a segment
    for i, message in enumerate(messages):
        upto = _render(tokenizer, messages[: i + 1], where)
        start = len(upto)
        consistent = full.startswith(upto)
        if message.role == "assistant":
            head = _render(tokenizer, messages[:i], where, generation_prompt=True)
            start = len(head)
            consistent = consistent and upto.startswith(head)
        if not (consistent and done <= start):
            raise EetuneError(
                f"{where}: the tokenizer's chat template does not render this conversation turn by turn, "
                "so assistant tokens cannot be told apart; use data.train_on_prompt=true"
            )
        segments.append((full[done:start], False))
        segments.append((full[start : len(upto)], True))
        done = len(upto)
    segments.append((full[done:], False))
    return [(text, assistant) for text, assistant in segments if text]


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    # verbose=False: documents longer than model_max_length are fine, they get packed.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


# Documents tokenised per tokenizer call: large corpora stream through in bounded memory.
ENCODE_CHUNK = 1024


def encode_documents(
    documents: Iterable[Document], tokenizer: PreTrainedTokenizerBase, *, train_on_prompt: bool
) -> TokenStream:
    """One stream: every document's tokens followed by EOS (documents are read as they come)."""
    builder = StreamBuilder(tokenizer, train_on_prompt)
    chunk: list[Document] = []
    for doc in documents:
        chunk.append(doc)
        if len(chunk) == ENCODE_CHUNK:
            builder.add(chunk)
            chunk = []
    builder.add(chunk)
    return builder.build()


class StreamBuilder:
    """Grows a TokenStream chunk by chunk; only token tensors are kept, never the documents."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, train_on_prompt: bool) -> None:
        if tokenizer.eos_token_id is None:
            raise EetuneError("the tokenizer has no EOS token to join documents with")
        self.tokenizer = tokenizer
        self.train_on_prompt = train_on_prompt
        self.num_documents = 0
        self.has_text = False  # any chat turn or non-blank text seen
        self._ids: list[torch.Tensor] = []
        self._trainable: list[torch.Tensor] = []

    def add(self, documents: list[Document]) -> None:
        """Append these documents' tokens, each followed by EOS."""
        if not documents:
            return
        tokenizer, eos = self.tokenizer, self.tokenizer.eos_token_id
        if any(doc.is_chat for doc in documents) and not getattr(tokenizer, "chat_template", None):
            raise EetuneError("the data holds chat records but the tokenizer has no chat template")
        self.num_documents += len(documents)
        self.has_text = self.has_text or any(doc.is_chat or (doc.text or "").strip() for doc in documents)
        # Every piece of every document, flattened so the tokenizer encodes them in one batch call.
        pieces: list[str] = []
        flags: list[bool] = []
        owners: list[int] = []
        for index, doc in enumerate(documents):
            if doc.text is not None:
                doc_pieces = [(doc.text, True)] if doc.text else []
            elif self.train_on_prompt:
                doc_pieces = [(_render(tokenizer, doc.messages, doc.where), True)]
            else:
                doc_pieces = chat_segments(tokenizer, doc.messages, doc.where)
            for text, trainable in doc_pieces:
                pieces.append(text)
                flags.append(trainable)
                owners.append(index)

        ids: list[int] = []
        trainable: list[bool] = []
        encoded = _encode(tokenizer, pieces)
        for k, piece_ids in enumerate(encoded):
            ids.extend(piece_ids)
            trainable.extend([flags[k]] * len(piece_ids))
            if k + 1 == len(encoded) or owners[k + 1] != owners[k]:
                ids.append(eos)
                # The separator is not assistant output: masked chat data does not learn it.
                trainable.append(self.train_on_prompt or not documents[owners[k]].is_chat)
        if ids:
            self._ids.append(torch.tensor(ids, dtype=torch.long))
            self._trainable.append(torch.tensor(trainable, dtype=torch.bool))

    def build(self) -> TokenStream:
        if not self._ids:
            raise EetuneError("the dataset is empty: it holds no text to tokenise")
        return TokenStream(torch.cat(self._ids), torch.cat(self._trainable))
