"""On-disk cache of the frozen backbone's activations, filled during the first epoch.

The backbone is frozen, so the hidden state entering each exit (and, when a loss needs the
final layer, the final normalised hidden state and the LM head's argmax over it) is the same
every epoch for the same example. Keeping the final *hidden state* rather than top-k logits
keeps KD exact (the head is re-applied, the 30-layer forward is not).

States are stored in the compute dtype (a cached step is bit-identical to an uncached one) or
in bfloat16 (`data.cache_dtype=bfloat16`: half the disk of float32, ~4.4 GB per key per million
tokens of SmolLM2; the trainer then rounds fresh states the same way, so every epoch sees the
same values).

A cache dir records what it holds (`identity.json`: base model fingerprint, a digest of the
training tokens, keys, dtype). Runs that match may share it (`data.cache_dir`); a run that does
not is refused rather than reading or overwriting another run's states.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eetune.errors import EetuneError
from eetune.rundir import atomic_write_json

IDENTITY_FILE = "identity.json"

# numpy has no bfloat16: store 16-bit floats as raw int16 and view them back.
_STORAGE = {torch.float32: np.float32, torch.bfloat16: np.int16, torch.float16: np.float16}


class HiddenCache:
    """Rows indexed by example id; `keys` are exit layers and optionally "final" (hidden states
    [seq_len, dim] stored in `dtype`), `index_keys` per-position token ids [seq_len] (int64)."""

    def __init__(
        self, directory: Path, keys: list[str], num_examples: int, seq_len: int, dim: int, dtype: torch.dtype,
        index_keys: tuple[str, ...] = (), identity: dict[str, Any] | None = None,
    ) -> None:
        """`identity`: what the states are of (model, data); a dir made for another is refused."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self.index_keys = index_keys
        self._filled_path = self.directory / "filled.npy"
        layouts = {key: ((num_examples, seq_len, dim), _STORAGE[dtype]) for key in keys}
        layouts |= {key: ((num_examples, seq_len), np.int64) for key in index_keys}
        identity = {**(identity or {}), "keys": sorted(layouts), "dtype": str(dtype).removeprefix("torch."),
                    "shape": [num_examples, seq_len, dim]}
        identity_path = self.directory / IDENTITY_FILE
        if identity_path.exists():
            recorded = json.loads(identity_path.read_text())
            if recorded != identity:
                differ = sorted(k for k in recorded.keys() | identity.keys() if recorded.get(k) != identity.get(k))
                raise EetuneError(
                    f"hidden-state cache {self.directory} holds states of another run ({', '.join(differ)} differ): "
                    "point data.cache_dir elsewhere or delete it"
                )
        # A dir without a record (made by an older eetune) or missing an array fills every row again.
        fresh = not identity_path.exists() or not self._filled_path.exists() or any(
            not self._matches(key, shape, storage) for key, (shape, storage) in layouts.items()
        )
        if fresh:
            self._filled_path.unlink(missing_ok=True)
            atomic_write_json(identity_path, identity)
        self.arrays = {
            key: np.lib.format.open_memmap(
                self.directory / f"{key}.npy",
                mode="w+" if fresh else "r+",
                dtype=storage,
                shape=shape,
            )
            for key, (shape, storage) in layouts.items()
        }
        self.filled = np.zeros(num_examples, bool) if fresh else np.load(self._filled_path)

    def _matches(self, key: str, shape: tuple[int, ...], storage: type) -> bool:
        path = self.directory / f"{key}.npy"
        if not path.exists():
            return False
        array = np.load(path, mmap_mode="r")
        return array.shape == shape and array.dtype == np.dtype(storage)

    def get(self, indices: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The cached states of these examples, or None if any of them is not cached yet."""
        rows = indices.numpy()
        if not self.filled[rows].all():
            return None
        return {key: self._to_tensor(array[rows], key) for key, array in self.arrays.items()}

    def put(self, indices: torch.Tensor, states: dict[str, torch.Tensor]) -> None:
        rows = indices.numpy()
        for key, array in self.arrays.items():
            value = states[key].detach().cpu().contiguous()
            if key in self.index_keys:
                value = value.to(torch.int64)
            elif self.dtype == torch.bfloat16:
                value = value.to(torch.bfloat16).view(torch.int16)
            array[rows] = value.numpy()
        self.filled[rows] = True

    def flush(self) -> None:
        """Make the data durable before recording it as filled (called at checkpoints)."""
        for array in self.arrays.values():
            array.flush()
        tmp = self._filled_path.with_suffix(".tmp.npy")
        np.save(tmp, self.filled)
        tmp.replace(self._filled_path)

    def _to_tensor(self, array: np.ndarray, key: str) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor.view(torch.bfloat16) if self.dtype == torch.bfloat16 and key not in self.index_keys else tensor
