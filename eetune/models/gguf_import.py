"""GGUF file -> Hugging Face checkpoint dir (fp32 safetensors, config.json, tokenizer).

transformers reads the GGUF metadata into a config and a tokenizer (``gguf_file=``). The
weights are dequantised here with the ``gguf`` package rather than through
``AutoModelForCausalLM.from_pretrained(gguf_file=...)``: that path requires ``accelerate``,
which eetune does not depend on, and this way each tensor can be reported as it converts.
Only the architectures eetune has families for are accepted (llama, mistral, qwen2: the
HF model types of eetune.models.catalog's families).

The dir is assembled in a temp dir beside ``out_dir`` and renamed into place, and a marker file
is written last, so an interrupted import never leaves a half-written ``out_dir``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eetune.errors import EetuneError
from eetune.models.catalog import FAMILIES
from eetune.models.checkpoint import publish_dir, staging_dir, write_safetensors

IMPORT_MARKER = "eetune_import.json"
IMPORT_FORMAT = 1  # bump when the produced dir changes, so cached imports are redone

_GGUF_MAGIC = b"GGUF"
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")
_HF_BLOCK_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def hf_tensor_name(gguf_name: str) -> str:
    """HF parameter name of a GGUF tensor (llama.cpp naming)."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_TENSORS:
        return f"model.layers.{match.group(1)}.{_BLOCK_TENSORS[match.group(2)]}"
    if gguf_name == "rope_freqs.weight":
        raise EetuneError(
            "this GGUF stores rope_freqs (Llama-3.1-style RoPE scaling), which its metadata does not "
            "describe in Hugging Face terms; use the original Hugging Face checkpoint instead"
        )
    raise EetuneError(f"unexpected tensor {gguf_name!r} in the GGUF file; eetune cannot import this model")


def gguf_tensor_name(hf_name: str) -> str:
    """GGUF tensor name (llama.cpp naming) of an HF parameter: the inverse of ``hf_tensor_name``."""
    for gguf_name, name in _GLOBAL_TENSORS.items():
        if name == hf_name:
            return gguf_name
    match = _HF_BLOCK_RE.fullmatch(hf_name)
    if match:
        for gguf_suffix, suffix in _BLOCK_TENSORS.items():
            if suffix == match.group(2):
                return f"blk.{match.group(1)}.{gguf_suffix}"
    raise EetuneError(f"tensor {hf_name!r} has no GGUF name; eetune cannot export this model to GGUF")


def _unpermute_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF's half split)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF's half split -> interleaved RoPE pairs), as its
    convert_hf_to_gguf.py applies to Llama-style models; the inverse of ``_unpermute_rope``."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class _Progress:
    """A rich progress display of import steps, or nothing when ``enabled`` is False."""

    def __init__(self, enabled: bool, title: str) -> None:
        self._progress: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn(f"[bold]{title}[/] {{task.description}}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), console=Console(stderr=True),
            )

    def __enter__(self) -> _Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    @contextmanager
    def step(self, description: str, total: int = 1) -> Iterator[Callable[[], None]]:
        """A step with ``total`` units; yields a callable that advances it by one unit."""
        if self._progress is None:
            yield lambda: None
            return
        task = self._progress.add_task(description, total=total)
        yield lambda: self._progress.advance(task)
        self._progress.update(task, completed=total)


def _check_gguf_file(gguf_path: Path) -> None:
    if not gguf_path.is_file():
        raise EetuneError(f"GGUF file {gguf_path} not found; pass the path of an existing .gguf file")
    with gguf_path.open("rb") as handle:
        magic = handle.read(4)
    if magic != _GGUF_MAGIC:
        raise EetuneError(f"{gguf_path} is not a GGUF file (bad magic {magic!r}); pass a .gguf model file")


def _read_config(gguf_path: Path) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
        )
    except Exception as exc:  # transformers raises ValueError/KeyError/... for unreadable metadata
        raise EetuneError(
            f"cannot read model metadata from {gguf_path} ({exc}); is it a complete GGUF model?"
        ) from exc
    # transformers model_type -> HF class; exactly the architectures eetune has families for.
    architectures = {family.hf_model_type: family.hf_architecture for family in FAMILIES.values()}
    if config.model_type not in architectures:
        raise EetuneError(
            f"{gguf_path} holds a {config.model_type!r} model; eetune imports {', '.join(architectures)}"
        )
    config.architectures = [architectures[config.model_type]]
    config.dtype = torch.float32
    return config


def _convert_tensors(reader: Any, config: Any, advance: Callable[[], None]) -> dict[str, torch.Tensor]:
    import gguf

    # llama.cpp permutes q/k rows of Llama-style models only; Qwen2 uses NeoX RoPE unpermuted.
    permuted = str(reader.fields["general.architecture"].contents()) == "llama"
    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        try:
            weight = gguf.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        except NotImplementedError as exc:
            raise EetuneError(
                f"tensor {tensor.name} uses quantisation {tensor.tensor_type.name}, which the gguf package "
                "cannot dequantise; use a GGUF with another quantisation (e.g. Q8_0, Q4_K_M)"
            ) from exc
        if permuted and name.endswith("q_proj.weight"):
            weight = _unpermute_rope(weight, config.num_attention_heads)
        elif permuted and name.endswith("k_proj.weight"):
            weight = _unpermute_rope(weight, config.num_key_value_heads)
        # F32 tensors come back as read-only views of the memory-mapped file: copy those.
        weight = np.ascontiguousarray(weight) if weight.flags.writeable else weight.copy()
        tensors[name] = torch.from_numpy(weight)
        advance()
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # tied models are saved without a separate head
    return tensors


def import_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> Path:
    """Convert ``gguf_path`` into a Hugging Face checkpoint dir at ``out_dir`` and return it.

    Weights are dequantised to float32 safetensors; config.json, generation_config.json and the
    tokenizer (tokenizer.json, its config and chat template) come from the GGUF metadata.
    ``out_dir`` must not exist yet.
    """
    import gguf
    from transformers import AutoTokenizer, GenerationConfig

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _check_gguf_file(gguf_path)
    if out_dir.exists():
        raise EetuneError(f"{out_dir} already exists; delete it or choose another output dir")

    staged = staging_dir(out_dir)
    try:
        with _Progress(progress, f"import {gguf_path.name}") as steps:
            with steps.step("config"):
                config = _read_config(gguf_path)
            with steps.step("tokenizer"):
                try:
                    tokenizer = AutoTokenizer.from_pretrained(
                        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
                    )
                except Exception as exc:  # transformers' GGUF tokenizer conversion raises many types
                    raise EetuneError(
                        f"cannot convert the tokenizer stored in {gguf_path} ({type(exc).__name__}: {exc}); "
                        "import the original Hugging Face checkpoint instead"
                    ) from exc
            try:
                reader = gguf.GGUFReader(str(gguf_path))
            except (ValueError, OSError) as exc:
                raise EetuneError(
                    f"cannot read the tensors of {gguf_path} ({exc}); is the file complete?"
                ) from exc
            with steps.step("dequantise tensors", total=len(reader.tensors)) as advance:
                tensors = _convert_tensors(reader, config, advance)
            with steps.step("write safetensors"):
                write_safetensors(tensors, staged)
                config.save_pretrained(str(staged))
                GenerationConfig.from_model_config(config).save_pretrained(str(staged))
                tokenizer.save_pretrained(str(staged))
                marker = {
                    "format": IMPORT_FORMAT,
                    "source": str(gguf_path),
                    "source_bytes": gguf_path.stat().st_size,
                }
                (staged / IMPORT_MARKER).write_text(json.dumps(marker, indent=2))
        publish_dir(staged, out_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return out_dir


def import_marker(out_dir: Path) -> dict[str, Any] | None:
    """The marker of a finished import in ``out_dir``, or None if there is none."""
    path = Path(out_dir) / IMPORT_MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
