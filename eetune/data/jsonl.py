"""Reading JSONL files as a stream of records, each named `path:line` for error messages."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from eetune.errors import EetuneError


def iter_jsonl(path: Path, what: str = "data") -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(where, record) for every non-blank line, read line by line (large files never sit in memory).

    Every line must hold a JSON object; a bad one fails as `path:line: what is wrong`. A `.gz`
    file is decompressed as it is read.
    """
    try:
        # newline="": lines end at \n (or \r\n); U+2028 and friends may sit unescaped inside JSON strings.
        if path.suffix == ".gz":
            file = gzip.open(path, "rt", encoding="utf-8", newline="")
        else:
            file = path.open(encoding="utf-8", newline="")
    except FileNotFoundError:
        raise EetuneError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise EetuneError(f"{what} path is a directory, not a file: {path}") from None
    with file:
        number = 0
        try:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EetuneError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(record, Mapping):
                    raise EetuneError(f"{where}: expected a JSON object, got {type(record).__name__}")
                yield where, record
        except UnicodeDecodeError as exc:
            raise EetuneError(f"{path}:{number + 1} is not UTF-8 text (byte {exc.start} of that line)") from None
        except (OSError, EOFError) as exc:  # gzip: not gzip data, or a truncated file
            raise EetuneError(f"{path}: cannot read it as gzip-compressed JSONL ({exc})") from None
