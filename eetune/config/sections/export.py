"""The `export` section: which exits `eetune export draft|hf|gguf` writes, and where."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from eetune.config.checks import check_choices


@dataclass
class ExportConfig:
    """`eetune export draft|hf|gguf` (shorthand on the command line: run_dir= exit= out= dtype=)."""

    # draft: layers 1..exit + that exit as a Hugging Face causal LM; hf: the base model + all
    # exits in one Hugging Face dir; gguf: the draft as a GGUF file (set by the subcommand).
    format: str = "draft"
    # The augment or tune run dir (or `eetune export hf` dir) whose exits to export.
    run_dir: Optional[str] = None
    # draft/gguf: the exit layer whose sub-network becomes the draft model.
    exit: Optional[int] = None
    # A new dir (draft, hf) or a new .gguf file (gguf); never overwritten.
    out: Optional[str] = None
    # draft/gguf weights: float32 (exact), bfloat16 or float16 (gguf: float32 or float16).
    dtype: str = "float32"

    def validate(self) -> None:
        check_choices(self, "export")
