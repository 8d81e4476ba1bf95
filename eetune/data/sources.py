"""Reading documents from a `data` config section: pydoc, plain text, JSONL, or HF `datasets`.

A document is either plain text or a chat conversation (a list of {role, content} turns);
JSONL and HF records are auto-detected one by one, so a file may mix both kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

from eetune.data.jsonl import iter_jsonl
from eetune.errors import EetuneError

if TYPE_CHECKING:
    from eetune.config.schema import DataConfig

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Document:
    """Exactly one of `text` and `messages` is set; `where` names it in error messages."""

    where: str
    text: str | None = None
    messages: tuple[Message, ...] | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def pydoc_documents() -> list[Document]:
    """The Python standard library's pydoc topics (~700 KB of real English, offline), one per topic."""
    from pydoc_data.topics import topics

    return [Document(where=f"pydoc topic '{key}'", text=topics[key]) for key in sorted(topics)]


def read_text_file(path: Path, what: str = "data") -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EetuneError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise EetuneError(f"{what} path is a directory, not a file: {path}") from None
    except UnicodeDecodeError as exc:
        raise EetuneError(f"{path} is not UTF-8 text (byte {exc.start})") from None


def parse_messages(value: Any, where: str) -> tuple[Message, ...]:
    """Validate one chat record's turns: a non-empty list of {role, content} with known roles."""
    if not isinstance(value, list) or not value:
        raise EetuneError(f"{where}: chat messages must be a non-empty list of {{role, content}} objects")
    messages = []
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, Mapping):
            raise EetuneError(f"{where}: message {number} is not an object with 'role' and 'content'")
        role, content = turn.get("role"), turn.get("content")
        if role not in CHAT_ROLES:
            raise EetuneError(
                f"{where}: message {number} has role {role!r}; roles must be one of {', '.join(CHAT_ROLES)}"
            )
        if not isinstance(content, str):
            raise EetuneError(f"{where}: message {number} ({role}) needs a string 'content'")
        messages.append(Message(role, content))
    return tuple(messages)


def record_document(record: Any, where: str, text_field: str, messages_field: str) -> Document:
    """A text or chat document from one JSON/HF record, detected by which field it holds."""
    if not isinstance(record, Mapping):
        raise EetuneError(f"{where}: expected a JSON object, got {type(record).__name__}")
    # HF datasets fills fields a row lacks with None, so None means "absent" here.
    if record.get(messages_field) is not None:
        return Document(where=where, messages=parse_messages(record[messages_field], where))
    text = record.get(text_field)
    if isinstance(text, str):
        return Document(where=where, text=text)
    raise EetuneError(
        f"{where}: expected a string field '{text_field}' (text) or a list '{messages_field}' (chat); "
        "set data.text_field / data.messages_field to match the file"
    )


def jsonl_documents(path: Path, text_field: str, messages_field: str) -> Iterator[Document]:
    """One document per non-blank line, read as needed; a bad line is reported as path:line."""
    return (record_document(record, where, text_field, messages_field) for where, record in iter_jsonl(path))


def hf_records(path: Path, hf_format: str) -> Iterable[Mapping[str, Any]]:
    """Rows of a local file read by HF `datasets` (json/csv/parquet/text builders)."""
    if not path.is_file():
        raise EetuneError(f"data file not found: {path}")
    import datasets  # slow import: only for this source

    # Paragraphs, not lines: joining every line of a text file with EOS would teach
    # the model to stop after each line.
    extra = {"sample_by": "paragraph"} if hf_format == "text" else {}
    try:
        return datasets.load_dataset(hf_format, data_files=str(path), split="train", **extra)
    except Exception as exc:  # datasets wraps parser errors in several exception types
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise EetuneError(f"{path}: HF datasets cannot read it as {hf_format}: {detail}") from None


def hf_documents(path: Path, hf_format: str, text_field: str, messages_field: str) -> list[Document]:
    return [
        record_document(record, f"{path} row {number}", text_field, messages_field)
        for number, record in enumerate(hf_records(path, hf_format), start=1)
    ]


@dataclass(frozen=True)
class Source:
    """One place documents come from: the `data` section itself, or one entry of `data.mix`."""

    name: str  # how error messages name it
    source: str
    path: str | None
    text_field: str = "text"
    messages_field: str = "messages"
    hf_format: str = "json"
    weight: float = 1.0


def sources_of(data_cfg: DataConfig) -> list[Source]:
    """The sources a `data` section reads: `data.mix` when set, else `data.source`/`data.path`."""
    fields = {"text_field": data_cfg.text_field, "messages_field": data_cfg.messages_field,
              "hf_format": data_cfg.hf_format}
    if not data_cfg.mix:
        return [Source(data_cfg.source, data_cfg.source, data_cfg.path, **fields)]
    return [Source(f"data.mix[{k}] ({entry.source})", entry.source, entry.path, weight=entry.weight, **fields)
            for k, entry in enumerate(data_cfg.mix)]


def load_documents(source: Source) -> Iterable[Document]:
    """The documents of a source, in file order (JSONL is streamed line by line)."""
    kind = source.source
    if kind == "pydoc":
        return pydoc_documents()
    if not source.path:
        if source.name != kind:
            raise EetuneError(f"{source.name} needs a path: {{source: {kind}, path: <file>, weight: ...}}")
        raise EetuneError(f"data.source={kind} needs data.path=<file>")
    path = Path(source.path).expanduser()
    if kind == "text":
        return [Document(where=str(path), text=read_text_file(path))]
    if kind == "jsonl":
        return jsonl_documents(path, source.text_field, source.messages_field)
    if kind == "hf":
        return hf_documents(path, source.hf_format, source.text_field, source.messages_field)
    raise EetuneError(f"unknown data.source '{kind}' (one of: pydoc, text, jsonl, hf)")
