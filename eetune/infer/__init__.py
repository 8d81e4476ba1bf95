"""Decoding engine: position-indexed KV caches, layer-by-layer decoder forward, sampling."""

from eetune.infer.generate import (
    GenerationResult,
    Generator,
    Span,
    attention_forward,
    generate,
    layer_forward,
)
from eetune.infer.kv_cache import LayerKVCache, caches_for_model
from eetune.infer.sampling import SamplingParams, make_rng, probabilities, sample

__all__ = [
    "GenerationResult",
    "Generator",
    "LayerKVCache",
    "SamplingParams",
    "Span",
    "attention_forward",
    "caches_for_model",
    "generate",
    "layer_forward",
    "make_rng",
    "probabilities",
    "sample",
]
