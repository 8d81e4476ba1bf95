"""Keep a growing distill corpus in git-sized gzip parts, so a fresh machine continues it.

    python scripts/corpus/parts.py restore CORPUS PARTS_DIR   # CORPUS.jsonl (+ meta, questions) from the parts
    python scripts/corpus/parts.py restore CORPUS PARTS_DIR --first 5   # from parts 000-004 only
    python scripts/corpus/parts.py save CORPUS PARTS_DIR      # complete batches not yet in a part -> a new part

A part holds whole batches only (a batch cut off mid-write stays out until it is complete), so
the parts concatenated are always a corpus `eetune data distill resume=true` accepts.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
from pathlib import Path

SIDE_FILES = (".meta.json", ".questions.txt")


def batch_of(line: bytes) -> int:
    return int(str(json.loads(line)["id"]).split(":")[0].removeprefix("b"))


def parts(parts_dir: Path) -> list[Path]:
    return sorted(parts_dir.glob("part-*.jsonl.gz"))


def restore(corpus: Path, parts_dir: Path, first: int | None = None) -> None:
    """Concatenate the parts (the `first` ones only, if given: a run pinned to a corpus prefix)."""
    chosen = parts(parts_dir)[:first]
    if first is not None and len(chosen) < first:
        sys.exit(f"{parts_dir} holds {len(chosen)} parts, fewer than the {first} asked for")
    if corpus.exists():
        sys.exit(f"{corpus} already exists: restore only fills a fresh machine")
    corpus.parent.mkdir(parents=True, exist_ok=True)
    for suffix in SIDE_FILES:
        if (parts_dir / ("corpus" + suffix)).exists():
            shutil.copyfile(parts_dir / ("corpus" + suffix), corpus.with_name(corpus.name + suffix))
    # Written aside, then renamed: an interrupted restore leaves no partial corpus behind.
    tmp = corpus.with_name(corpus.name + ".tmp")
    with tmp.open("wb") as out:
        for part in chosen:
            with gzip.open(part, "rb") as f:
                shutil.copyfileobj(f, out)
    tmp.replace(corpus)
    print(f"restored {corpus} from {len(chosen)} parts")


def save(corpus: Path, parts_dir: Path) -> None:
    if not corpus.exists():
        print(f"nothing to save: {corpus} does not exist yet")
        return
    saved_lines = 0
    for part in parts(parts_dir):
        with gzip.open(part, "rb") as f:
            saved_lines += sum(1 for _ in f)
    lines = corpus.read_bytes().splitlines(keepends=True)
    # Whole lines only, and never the last batch unless a later batch has begun after it: a
    # running distill may still be writing it (each batch is appended in one write).
    complete = [line for line in lines if line.endswith(b"\n")]
    if complete:
        last = batch_of(complete[-1])
        finished = [line for line in complete if batch_of(line) < last]
        meta = json.loads(corpus.with_name(corpus.name + ".meta.json").read_text())
        batch_size = meta["distill"]["batch_size"]
        if len(complete) == len(finished) + batch_size:
            finished = complete  # the last batch is whole too
        complete = finished
    new = complete[saved_lines:]
    parts_dir.mkdir(parents=True, exist_ok=True)
    for suffix in SIDE_FILES:
        side = corpus.with_name(corpus.name + suffix)
        if side.exists():
            shutil.copyfile(side, parts_dir / ("corpus" + suffix))
    if not new:
        print("nothing new to save")
        return
    part = parts_dir / f"part-{len(parts(parts_dir)):03d}.jsonl.gz"
    tmp = part.with_suffix(".tmp")
    with gzip.open(tmp, "wb", compresslevel=9) as f:
        f.writelines(new)
    tmp.rename(part)
    tokens = sum(json.loads(line)["tokens"] for line in new)
    print(f"saved {len(new)} records ({tokens} tokens) as {part}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("restore", "save"))
    parser.add_argument("corpus", type=Path)
    parser.add_argument("parts_dir", type=Path)
    parser.add_argument("--first", type=int, default=None, help="restore: only the first N parts")
    args = parser.parse_args()
    if args.action == "restore":
        restore(args.corpus, args.parts_dir, args.first)
    else:
        save(args.corpus, args.parts_dir)


if __name__ == "__main__":
    main()
