"""A draft decoder as a GGUF file, so llama.cpp can use it as a speculative draft model.

Tensors and metadata follow llama.cpp's own ``convert_hf_to_gguf.py``: HF names mapped to GGUF
names (the inverse of eetune's GGUF import), q/k rows of Llama-style models permuted into
llama.cpp's interleaved RoPE layout, unquantised F32 (or F16 for matrices, norms and biases
staying F32), Llama 3 RoPE scaling as a ``rope_freqs`` tensor, and the tokenizer as
``tokenizer.ggml.*`` metadata. Only byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2.5) are
written; a SentencePiece vocabulary needs its scores, which llama.cpp's converter reads from
``tokenizer.model``: run that converter on an ``eetune export draft`` dir instead.

Tensors are read, converted and written one at a time, so a draft of any size needs the memory
of its largest tensor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from eetune.errors import EetuneError
from eetune.export.draft import Draft, hf_tensors
from eetune.models import hf_config as hfc
from eetune.models.gguf_import import gguf_tensor_name, permute_rope
from eetune.models.catalog import MODELS
from eetune.models.registry import ModelFamily
from eetune.rundir import atomic_write

GGUF_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def save_draft_gguf(
    draft: Draft,
    family: ModelFamily,
    model_name: str,
    checkpoint_dir: Path,
    out_file: Path,
    dtype: torch.dtype,
    title: str,
) -> Path:
    """Write ``draft`` (torchtune weights of a ``family`` decoder) as one GGUF file, atomically.

    ``checkpoint_dir`` is the base model's HF dir, read for its tokenizer; ``title`` becomes
    ``general.name``.
    """
    import gguf

    out_file = Path(out_file)
    if out_file.exists():
        raise EetuneError(f"{out_file} already exists; delete it or choose another out=...")
    if dtype not in GGUF_DTYPES.values():
        raise EetuneError(f"GGUF export writes float32 or float16 weights, not {dtype}: pass dtype=float32 or float16")
    arch = family.gguf_arch  # llama.cpp's architecture (the family record's)
    if arch is None:
        raise EetuneError(f"eetune cannot write {family.name} models as GGUF")
    config = draft.hf_config
    tokenizer = _TokenizerMetadata(checkpoint_dir, int(config["vocab_size"]))
    tensors = gguf_tensors(draft, family, arch, dtype)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            writer.add_name(title)
            writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == torch.float32 else gguf.LlamaFileType.MOSTLY_F16)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _add_hyperparameters(writer, config, arch)
            tokenizer.add_to(writer, gguf_pre_tokenizer(model_name, family))
            # add_tensor would keep every array until write_tensors_to_file: declare them all (the
            # header lists them), then convert and write them one at a time.
            for name, planned in tensors.items():
                writer.add_tensor_info(name, planned.shape, planned.dtype, planned.nbytes)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for name, planned in tensors.items():
                writer.write_tensor_data(planned.array(name))
        finally:
            writer.close()

    atomic_write(out_file, write)
    return out_file


def gguf_pre_tokenizer(model_name: str, family: ModelFamily) -> str:
    """llama.cpp's pre-tokenizer name: the named model's own, else its family's (records in
    eetune.models.catalog); it cannot be read off tokenizer.json. Default: llama.cpp's GPT-2-like."""
    entry = MODELS.get(model_name)
    return (entry.gguf_pre_tokenizer if entry is not None else None) or family.gguf_pre_tokenizer


@dataclass(frozen=True)
class GGUFTensor:
    """A tensor to write: its array's shape and dtype up front, the array itself when read."""

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def array(self, name: str) -> np.ndarray:
        array = self.read()
        if array.shape != self.shape or array.dtype != self.dtype:
            raise EetuneError(f"internal error: {name} is {array.dtype}{list(array.shape)}, not {self.dtype}{list(self.shape)}")
        return array


def gguf_tensors(draft: Draft, family: ModelFamily, arch: str, dtype: torch.dtype) -> dict[str, GGUFTensor]:
    """GGUF name -> tensor in llama.cpp's layout, read and converted one at a time when written;
    matrices in ``dtype``, vectors in float32."""
    config = draft.hf_config
    hf = hf_tensors(draft, family, torch.float32)
    heads, kv_heads = int(config["num_attention_heads"]), hfc.num_kv_heads(config)

    def read(hf_name: str, to: np.dtype) -> np.ndarray:
        array = hf[hf_name].cpu().numpy()
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            array = permute_rope(array, heads)
        elif arch == "llama" and hf_name.endswith("k_proj.weight"):
            array = permute_rope(array, kv_heads)
        return np.ascontiguousarray(array.astype(to, copy=False))

    out: dict[str, GGUFTensor] = {}
    for hf_name in hf:
        shape = tuple(hf.meta(hf_name).shape)
        to = np.dtype(np.float16 if len(shape) > 1 and dtype == torch.float16 else np.float32)
        out[gguf_tensor_name(hf_name)] = GGUFTensor(shape, to, partial(read, hf_name, to))
    factors = llama3_rope_factors(config)
    if factors is not None:
        out["rope_freqs.weight"] = GGUFTensor(factors.shape, factors.dtype, lambda: factors)
    return out


def llama3_rope_factors(config: Mapping[str, Any]) -> np.ndarray | None:
    """Per-frequency divisors of Llama 3 scaled RoPE (llama.cpp's ``rope_freqs``), or None.

    Read off torchtune's ``Llama3ScaledRoPE`` (what eetune computes with): plain RoPE frequencies
    divided by its scaled ones.
    """
    scaling = hfc.rope_scaling(config)
    if scaling is None:
        return None
    if scaling["rope_type"] != "llama3":
        raise EetuneError(f"RoPE scaling {scaling['rope_type']!r} cannot be written to GGUF by eetune")
    from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE

    head_dim = hfc.head_dim(config)
    base = hfc.rope_theta(config, 10_000.0)
    rope = Llama3ScaledRoPE(dim=head_dim, max_seq_len=1, base=base, scale_factor=float(scaling.get("factor", 8.0)))
    plain = 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    return (plain / rope.theta).numpy().astype(np.float32)


def _add_hyperparameters(writer: Any, config: Mapping[str, Any], arch: str) -> None:
    writer.add_context_length(int(config.get("max_position_embeddings") or 4096))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(hfc.num_layers(config))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(hfc.num_kv_heads(config))
    writer.add_rope_freq_base(hfc.rope_theta(config, 10_000.0))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    if arch == "llama":
        writer.add_rope_dimension_count(hfc.head_dim(config))


class _TokenizerMetadata:
    """The base model's byte-level BPE tokenizer as ``tokenizer.ggml.*`` fields.

    Tokens by id, padded to the model's vocabulary with unused placeholders (as llama.cpp's
    converter does); added special tokens are control tokens; merges, special ids, add-BOS and
    the chat template come from gguf's own ``SpecialVocab`` reader of the tokenizer files.
    """

    def __init__(self, checkpoint_dir: Path, vocab_size: int) -> None:
        import gguf
        from transformers import AutoTokenizer

        path = Path(checkpoint_dir) / "tokenizer.json"
        spec = json.loads(path.read_text()) if path.is_file() else {}
        model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
        if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
            raise EetuneError(
                f"the tokenizer in {checkpoint_dir} is not a byte-level BPE (GPT-2 style), the only kind eetune "
                "writes to GGUF: export the draft with `eetune export draft` and convert that dir with "
                "llama.cpp's convert_hf_to_gguf.py"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir), local_files_only=True)
        by_id = {index: token for token, index in tokenizer.get_vocab().items()}
        added = tokenizer.added_tokens_decoder
        if max(by_id) >= vocab_size:
            raise EetuneError(
                f"the tokenizer in {checkpoint_dir} has ids up to {max(by_id)}, beyond the model's vocab_size {vocab_size}"
            )
        self.tokens: list[str] = []
        self.types: list[int] = []
        for index in range(vocab_size):
            if index not in by_id:
                self.tokens.append(f"[PAD{index}]")
                self.types.append(gguf.TokenType.UNUSED)
            else:
                self.tokens.append(by_id[index])
                special = index in added and added[index].special
                user = index in added and not special
                self.types.append(
                    gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED if user else gguf.TokenType.NORMAL
                )
        self.special = gguf.SpecialVocab(Path(checkpoint_dir), load_merges=bool(model.get("merges")), n_vocab=vocab_size)

    def add_to(self, writer: Any, pre: str) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        self.special.add_to_gguf(writer, quiet=True)
