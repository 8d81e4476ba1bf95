"""The rich console every command prints through.

On a terminal rich wraps long lines at the terminal's width. Anywhere else (a pipe, a log
file, a script capturing output) it would wrap at 80 columns and split summaries, paths,
commands and verdicts mid-line, so there it never wraps text: each printed line stays one
line. Tables and progress bars keep their layout.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console


def make_console(*, stderr: bool = True, **kwargs: Any) -> Console:
    """A Console on stderr (stdout with stderr=False, or `file=`) that wraps only on a terminal."""
    console = Console(stderr=stderr, **kwargs)
    if not console.is_terminal:
        console.soft_wrap = True
    return console
