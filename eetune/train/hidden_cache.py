"""On-disk cache of the frozen backbone's activations, filled during the first epoch.

The backbone is frozen, so the hidden state entering each exit (and, when a loss needs the
final layer, the final normalised hidden state) is the same every epoch for the same
example. Storing them in the compute dtype makes a cached step bit-identical to an
uncached one; keeping the final *hidden state* rather than top-k logits keeps KD exact
(the head is re-applied, the 30-layer forward is not).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# numpy has no bfloat16: store 16-bit floats as raw int16 and view them back.
_STORAGE = {torch.float32: np.float32, torch.bfloat16: np.int16, torch.float16: np.float16}


class HiddenCache:
    """Rows indexed by example id; `keys` are exit layers and optionally "final"."""

    def __init__(
        self, directory: Path, keys: list[str], num_examples: int, seq_len: int, dim: int, dtype: torch.dtype
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        shape = (num_examples, seq_len, dim)
        self.arrays = {
            key: np.lib.format.open_memmap(
                self.directory / f"{key}.npy",
                mode="r+" if (self.directory / f"{key}.npy").exists() else "w+",
                dtype=_STORAGE[dtype],
                shape=shape,
            )
            for key in keys
        }
        self._filled_path = self.directory / "filled.npy"
        self.filled = np.load(self._filled_path) if self._filled_path.exists() else np.zeros(num_examples, bool)

    def get(self, indices: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The cached states of these examples, or None if any of them is not cached yet."""
        rows = indices.numpy()
        if not self.filled[rows].all():
            return None
        return {key: self._to_tensor(array[rows]) for key, array in self.arrays.items()}

    def put(self, indices: torch.Tensor, states: dict[str, torch.Tensor]) -> None:
        rows = indices.numpy()
        for key, array in self.arrays.items():
            value = states[key].detach().cpu().contiguous()
            if self.dtype == torch.bfloat16:
                value = value.view(torch.int16)
            array[rows] = value.numpy()
        self.filled[rows] = True

    def flush(self) -> None:
        """Make the data durable before recording it as filled (called at checkpoints)."""
        for array in self.arrays.values():
            array.flush()
        tmp = self._filled_path.with_suffix(".tmp.npy")
        np.save(tmp, self.filled)
        tmp.replace(self._filled_path)

    def _to_tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor.view(torch.bfloat16) if self.dtype == torch.bfloat16 else tensor
