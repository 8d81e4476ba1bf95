"""Exits for the rest of the ecosystem: draft models (HF dir, GGUF) and base + exits bundles."""

from eetune.export.bundle import export_bundle, load_exported
from eetune.export.draft import Draft, build_draft, check_exportable, save_draft, stream_draft
from eetune.export.gguf_file import save_draft_gguf
from eetune.export.lazy import LazyTensors

__all__ = [
    "Draft", "LazyTensors", "build_draft", "check_exportable", "export_bundle", "load_exported", "save_draft",
    "save_draft_gguf", "stream_draft",
]
