"""Tensors read only when they are written, so exporting a draft of a base that fits no machine's
memory holds one tensor at a time.

`LazyTensors` maps names to tensors, each read by its own reader when asked for and not kept. It
knows every tensor's shape up front (as a meta tensor), which is what a file header needs before
any data. `write_safetensors` writes one as ``model.safetensors`` (or Hugging Face shards plus
their index, as `eetune.models.checkpoint.write_safetensors` does for tensors in memory): the
safetensors package serialises only tensors that are all in memory at once, so the format's
header (a JSON table of dtypes, shapes and byte ranges) is written here, then the tensors in order.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from eetune.errors import EetuneError
from eetune.models.checkpoint import SAFETENSORS_INDEX

Reader = Callable[[], torch.Tensor]

# safetensors' names of the dtypes eetune writes.
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


class LazyTensors(Mapping[str, torch.Tensor]):
    """Tensors by name, each read when asked for (every time: nothing is cached)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[torch.Tensor, Reader]] = {}

    def add(self, name: str, meta: torch.Tensor, read: Reader) -> None:
        """``read`` returns a tensor of ``meta``'s shape (its dtype may be known only once read)."""
        self._entries[name] = (meta.to("meta"), read)

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """A tensor already in memory."""
        self.add(name, tensor, lambda: tensor)

    def meta(self, name: str) -> torch.Tensor:
        return self._entries[name][0]

    def __getitem__(self, name: str) -> torch.Tensor:
        meta, read = self._entries[name]
        tensor = read()
        if tensor.shape != meta.shape:
            raise EetuneError(
                f"the checkpoint's {name} has shape {list(tensor.shape)}, but its config.json gives {list(meta.shape)}"
            )
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def write_safetensors(tensors: LazyTensors, out_dir: Path, max_shard_bytes: int = 5 << 30) -> list[str]:
    """Write HF-named tensors (whose metas give their dtypes) as ``model.safetensors`` or HF-style
    shards plus an index, reading one tensor at a time."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in tensors:
        nbytes = _nbytes(tensors.meta(name))
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        _write_file(tensors, shards[0], Path(out_dir) / "model.safetensors")
        return ["model.safetensors"]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, names in zip(files, shards):
        _write_file(tensors, names, Path(out_dir) / file)
    weight_map = {name: file for file, names in zip(files, shards) for name in names}
    total = sum(_nbytes(tensors.meta(name)) for name in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (Path(out_dir) / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    return files


def _nbytes(meta: torch.Tensor) -> int:
    return meta.numel() * meta.element_size()


def _write_file(tensors: LazyTensors, names: list[str], path: Path) -> None:
    """One safetensors file: 8-byte header length, the JSON header (padded to 8 bytes, as
    safetensors pads it), then each tensor's bytes in the header's order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}  # transformers requires "pt"
    offset = 0
    for name in names:
        meta = tensors.meta(name)
        end = offset + _nbytes(meta)
        header[name] = {"dtype": _SAFETENSORS_DTYPES[meta.dtype], "shape": list(meta.shape), "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for name in names:
            tensor = tensors[name].detach().to("cpu").contiguous()
            if tensor.dtype != tensors.meta(name).dtype:
                raise EetuneError(f"internal error: {name} is {tensor.dtype}, not {tensors.meta(name).dtype} as declared")
            file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
