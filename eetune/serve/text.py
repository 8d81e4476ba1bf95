"""Tokens to text as they arrive, releasing only text that can no longer change, up to a stop string."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers.convert_slow_tokenizer import bytes_to_unicode

_INCOMPLETE = "\ufffd"  # what a decoder shows for the first bytes of a character still to come


class TextAssembler:
    """Decodes a growing token list; `add` returns the newly final text, `finish` the rest.

    Held back until later tokens settle them: an incomplete UTF-8 character at the end, and an
    ending that could be the start of a stop string. When a stop string appears, the text ends
    just before it and `stopped` turns True. The released pieces concatenate to `text`, so a
    streamed response and a whole one are the same text.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.tokens: list[int] = []
        self.text = ""  # released so far
        self.stopped = False

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        settled = self._decode().rstrip(_INCOMPLETE)
        cut = self._stop_at(settled)
        if cut is not None:
            self.stopped = True
            return self._release(settled[:cut])
        return self._release(settled[: len(settled) - self._possible_stop_start(settled)])

    def finish(self) -> str:
        """Everything not released yet (no more tokens are coming)."""
        if self.stopped:
            return ""
        decoded = self._decode()
        cut = self._stop_at(decoded)
        if cut is not None:
            self.stopped = True
            decoded = decoded[:cut]
        return self._release(decoded)

    def _decode(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _stop_at(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _possible_stop_start(self, text: str) -> int:
        """Length of the longest ending of `text` that begins some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _release(self, text: str) -> str:
        # Released text is never taken back; a tokenizer that re-spells earlier text (none of
        # the byte-level BPEs we load do, once incomplete characters are held back) loses it.
        if not text.startswith(self.text):
            return ""
        delta = text[len(self.text) :]
        self.text = text
        return delta


class TokenSpeller:
    """The bytes and text of single token ids, as `logprobs` report them.

    Byte-level BPE tokens (GPT-2, SmolLM2, Llama 3, Qwen2) are spelled from their vocabulary
    entry, so a token holding part of a UTF-8 character gets its exact bytes (its text shows
    U+FFFD); other tokenizers fall back to decoding the id alone.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()} if _byte_level(tokenizer) else None
        self._cache: dict[int, bytes] = {}

    def bytes(self, token: int) -> bytes:
        spelled = self._cache.get(token)
        if spelled is None:
            spelled = self._cache[token] = self._spell(token)
        return spelled

    def text(self, token: int) -> str:
        return self.bytes(token).decode("utf-8", errors="replace")

    def _spell(self, token: int) -> bytes:
        if self._byte_of is not None:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            if isinstance(piece, str) and all(char in self._byte_of for char in piece):
                return bytes(self._byte_of[char] for char in piece)
        return self.tokenizer.decode([token]).encode("utf-8")


def _byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"
