"""A cheap identifier of a model's weights, recorded in run manifests.

Exits are trained for one exact backbone; a manifest stores its fingerprint so a run, resume or
export can refuse a different base. Hashing every byte of a 13B model costs seconds to minutes,
so this hashes, in sorted name order: each tensor's name and shape, and a strided sample of at
most ``SAMPLES_PER_TENSOR`` of its values (always including the first and the last element).

Sampled values are rounded to bfloat16 and hashed as their bit patterns, and dtypes themselves
are not hashed: the same checkpoint loaded in float32 or bfloat16 gives the same fingerprint.
(A float16 load usually does too, but double rounding and float16's narrower range are not
guaranteed to agree.) The price is that a change smaller than bfloat16 resolution at every
sampled position goes unnoticed; any real fine-tune or a different initialisation changes
thousands of sampled values far more than that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

SAMPLES_PER_TENSOR = 1024


def sample_indices(numel: int, samples: int = SAMPLES_PER_TENSOR) -> torch.Tensor:
    """Flat indices hashed for a tensor of ``numel`` elements: evenly spaced, first and last included."""
    if numel <= samples:
        return torch.arange(numel)
    # Integer arithmetic: float linspace rounds past the end for tensors of tens of millions.
    return torch.arange(samples, dtype=torch.int64) * (numel - 1) // (samples - 1)


def fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 hex digest of names, shapes and bf16-rounded sampled values (see module doc)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach()
        digest.update(name.encode())
        digest.update(repr(tuple(tensor.shape)).encode())
        flat = tensor.reshape(-1)
        sample = flat[sample_indices(flat.numel()).to(flat.device)]
        bits = sample.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()
        digest.update(bits)
    return digest.hexdigest()
