"""Decoding engine: position-indexed KV caches, layer-by-layer decoder forward, sampling."""

from eetune.infer.generate import (
    GenerationResult,
    Generator,
    Span,
    attention_forward,
    generate,
    layer_forward,
)
from eetune.infer.engine import DecodeCaches, DecodeResult, DecodeSettings, Engine
from eetune.infer.kv_cache import LayerKVCache, caches_for_model
from eetune.infer.sampling import SamplingParams, TokenLogprob, make_rng, probabilities, sample
from eetune.infer.speculative import accept_greedy, accept_sampled

__all__ = [
    "DecodeCaches",
    "DecodeResult",
    "DecodeSettings",
    "Engine",
    "GenerationResult",
    "Generator",
    "LayerKVCache",
    "SamplingParams",
    "Span",
    "TokenLogprob",
    "accept_greedy",
    "accept_sampled",
    "attention_forward",
    "caches_for_model",
    "generate",
    "layer_forward",
    "make_rng",
    "probabilities",
    "sample",
]
