"""Full-model autoregressive generation over a torchtune decoder with our position-indexed KV cache.

The decoder is driven layer by layer (`embed` -> `run_layers` -> `final_logits`) so an
early-exit engine can stop after any layer and run the deeper layers later for the same
positions; the math per layer is exactly torchtune's `TransformerSelfAttentionLayer.forward`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchtune.modules import MultiHeadAttention, TransformerDecoder, TransformerSelfAttentionLayer

from eetune.errors import EetuneError
from eetune.infer.fast_block import FastBlock
from eetune.infer.kv_cache import LayerKVCache, caches_for_model
from eetune.infer.sampling import SamplingParams, make_rng, sample


@dataclass(frozen=True, slots=True)
class Span:
    """Contiguous sequence positions [start, start + length) processed by one forward.

    `mask` ([length, start + length] bool, True = may attend) is only needed when a chunk of
    several tokens follows cached ones; a single token attends to every cached position and
    a chunk starting at 0 is plain causal, so both carry None and cost no mask. Left-padded
    batches (eetune.infer.engine) give a per-row mask [batch, 1, length, start + length].
    """

    start: int
    length: int
    input_pos: Tensor
    mask: Tensor | None

    @property
    def kv_len(self) -> int:
        return self.start + self.length


def attention_forward(attn: MultiHeadAttention, x: Tensor, span: Span, cache: LayerKVCache) -> Tensor:
    """torchtune's self-attention math on x ([b, s, d]), reading and writing `cache` by position."""
    b, s, _ = x.shape
    n_h, n_kv, h_d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(b, s, n_h, h_d)
    k = attn.k_proj(x).view(b, s, n_kv, h_d)
    v = attn.v_proj(x).view(b, s, n_kv, h_d)
    if attn.pos_embeddings is not None:
        # RoPE acts on each head alone: one call over q and k heads together halves its
        # ~15 small ops per layer, which matter when decoding one token at a time.
        qk = attn.pos_embeddings(torch.cat((q, k), dim=2), input_pos=span.input_pos)
        q, k = qk[:, :, :n_h], qk[:, :, n_h:]
    # [b, heads, s, h_d]; torchtune normalises q/k after the transpose, so do we.
    q = q.transpose(1, 2)
    k = k.transpose(1, 2)
    v = v.transpose(1, 2)
    if attn.q_norm is not None:
        q = attn.q_norm(q)
    if attn.k_norm is not None:
        k = attn.k_norm(k)
    cache.write(span.input_pos, k, v)
    keys, values = cache.read(span.kv_len)
    if s == 1:
        # One query per head: the n_h // n_kv heads sharing a KV head (torchtune groups them
        # contiguously) become a query block of that head, so GQA needs no expanded copy of
        # the cache.
        # A mask is only given for left-padded batches: [b, 1, 1, kv_len] broadcasts over the block.
        out = F.scaled_dot_product_attention(q.reshape(b, n_kv, n_h // n_kv, h_d), keys, values, attn_mask=span.mask)
    else:
        out = F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=span.mask,
            is_causal=span.mask is None,
            enable_gqa=n_h != n_kv,
        ).transpose(1, 2)
    return attn.output_proj(out.reshape(b, s, n_h * h_d))


def layer_forward(layer: TransformerSelfAttentionLayer, x: Tensor, span: Span, cache: LayerKVCache) -> Tensor:
    """One decoder block, same math as `TransformerSelfAttentionLayer.forward`, with our cache."""
    h = layer.sa_scale(attention_forward(layer.attn, layer.sa_norm(x), span, cache)) + x
    return h + layer.mlp_scale(layer.mlp(layer.mlp_norm(h)))


@dataclass(slots=True)
class GenerationResult:
    """One finished request. `tokens` are the new tokens only, a final stop token included."""

    tokens: list[int]
    prompt_len: int
    prefill_s: float  # prompt forward + first token: time to first token
    decode_s: float  # every later token
    tokens_per_s: float  # decode only: (len(tokens) - 1) / decode_s
    stopped_by: Literal["eos", "length", "callback"]  # callback: on_token returned True


def _check_supported(model: TransformerDecoder) -> None:
    if not isinstance(model, TransformerDecoder):
        raise EetuneError(f"generation needs a torchtune TransformerDecoder, got {type(model).__name__}")
    for i, layer in enumerate(model.layers):
        if not isinstance(layer, TransformerSelfAttentionLayer) or not isinstance(layer.attn, MultiHeadAttention):
            raise EetuneError(
                f"layer {i} of the model is a {type(layer).__name__}; generation supports text decoders "
                "built from torchtune TransformerSelfAttentionLayer blocks (Llama, Qwen2, SmolLM2, ...)"
            )


def _check_request_length(prompt_len: int, max_new_tokens: int, max_seq_len: int, whose: str) -> None:
    if max_new_tokens < 0:
        raise EetuneError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if prompt_len + max_new_tokens > max_seq_len:
        raise EetuneError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{prompt_len + max_new_tokens} exceeds {whose} max_seq_len of {max_seq_len}; "
            "shorten the prompt or lower max_new_tokens"
        )


class Generator:
    """A model plus its KV caches and the number of positions already filled (`length`).

    Low level (for early-exit engines): `span`, `embed`, `run_layers`, `final_logits`; they
    do not touch `length`. Full model: `prefill`, `decode_step`, `rewind`, `generate`.
    """

    def __init__(
        self, model: TransformerDecoder, *, max_seq_len: int | None = None, batch_size: int = 1, fast: bool = True
    ) -> None:
        _check_supported(model)
        limit = model.max_seq_len
        max_seq_len = limit if max_seq_len is None else max_seq_len
        if not 1 <= max_seq_len <= limit:
            raise EetuneError(f"cache length must be between 1 and the model's max_seq_len {limit}, got {max_seq_len}")
        if batch_size < 1:
            raise EetuneError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.layers: list[TransformerSelfAttentionLayer] = list(model.layers)
        self.num_layers = len(self.layers)
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.vocab_size: int = model.tok_embeddings.num_embeddings
        self.device = model.tok_embeddings.weight.device
        # A pipeline stage (eetune.parallel.inference_pp) runs and caches its own layers only.
        self.pipeline = getattr(model, "layer_pipeline", None)
        self.caches = caches_for_model(model, batch_size=batch_size, max_seq_len=max_seq_len)
        # Plain Llama-style blocks decode through FastBlock (same math, fewer ops).
        self.blocks = [
            FastBlock(layer) if fast and FastBlock.supports(layer) and cache is not None else None
            for layer, cache in zip(self.layers, self.caches)
        ]
        # Views of these serve every step's positions and token input without allocating.
        self._positions = torch.arange(max_seq_len, device=self.device)
        self._token = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.length = 0

    # -- layer-by-layer building blocks -------------------------------------------------

    def span(self, start: int, length: int) -> Span:
        """Positions [start, start + length), with the mask their attention needs."""
        end = start + length
        if start < 0 or length < 1 or end > self.max_seq_len:
            raise EetuneError(
                f"positions [{start}, {end}) do not fit the KV cache of {self.max_seq_len} positions"
            )
        input_pos = self._positions[start:end]
        mask = None
        if length > 1 and start > 0:
            mask = self._positions[:end] <= input_pos[:, None]
        return Span(start, length, input_pos, mask)

    def row_span(self, starts: Tensor, length: int = 1) -> Span:
        """`length` tokens per row, row r at positions [starts[r], starts[r] + length) (starts [b], int64).

        Rows of a continuous batch hold sequences of different lengths: each attends to its own
        positions up to the query's only (entries beyond are a former occupant's, masked out).
        """
        kv_len = int(starts.max()) + length
        if int(starts.min()) < 0 or length < 1 or kv_len > self.max_seq_len:
            raise EetuneError(f"positions up to {kv_len - 1} do not fit the KV cache of {self.max_seq_len} positions")
        input_pos = starts[:, None] + self._positions[:length]  # [b, length]
        mask = (self._positions[:kv_len] <= input_pos[:, :, None])[:, None]  # [b, 1, length, kv_len]
        return Span(kv_len - length, length, input_pos, mask)

    def row_caches(self, start: int, end: int) -> list[LayerKVCache]:
        """Every layer's cache restricted to rows [start, end) (views)."""
        return [None if cache is None else cache.rows(start, end) for cache in self.caches]

    def embed(self, tokens: Tensor) -> Tensor:
        return self.model.tok_embeddings(tokens)

    def run_layers(
        self, h: Tensor, start: int, end: int, span: Span, caches: Sequence[LayerKVCache] | None = None
    ) -> Tensor:
        """Hidden states after layers [start, end) (0-based), writing their caches at `span`
        (`caches`: e.g. `row_caches` for some rows of the batch; default all of them)."""
        layers, blocks, pipeline = self.layers, self.blocks, self.pipeline
        caches = self.caches if caches is None else caches
        for i in range(start, end):
            if pipeline is not None and not pipeline.owns(i):
                h = pipeline.pass_on(h, i, end)  # another stage's layer
                continue
            block = blocks[i]
            if block is None:
                h = layer_forward(layers[i], h, span, caches[i])
            else:
                h = block(h, span.input_pos, span.kv_len, span.mask, caches[i])
            if pipeline is not None:
                h = pipeline.pass_on(h, i, end)
        return h

    def final_logits(self, h: Tensor) -> Tensor:
        """Final norm + LM head, in fp32 as torchtune returns them."""
        return self.model.output(self.model.norm(h)).float()

    # -- full-model decoding ------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, tokens: Tensor, *, all_logits: bool = False) -> Tensor:
        """Run tokens [b, s] at positions length.. through all layers and advance `length`.

        Returns logits of the last position [b, vocab], or of every position [b, s, vocab].
        """
        if tokens.shape[0] != self.batch_size:
            raise EetuneError(f"got a batch of {tokens.shape[0]} sequences for a generator of batch_size {self.batch_size}")
        span = self.span(self.length, tokens.shape[1])
        h = self.run_layers(self.embed(tokens), 0, self.num_layers, span)
        logits = self.final_logits(h if all_logits else h[:, -1])
        self.length = span.kv_len
        return logits

    def prefill(self, prompt_ids: Sequence[int] | Tensor, *, all_logits: bool = False) -> Tensor:
        """Start a new sequence from the prompt; returns the next-token logits [b, vocab]."""
        tokens = self._as_tokens(prompt_ids)
        self.length = 0
        return self.forward(tokens, all_logits=all_logits)

    def decode_step(self, token: int) -> Tensor:
        """Feed one token (batch 1) at the next position; returns next-token logits [1, vocab]."""
        if not 0 <= token < self.vocab_size:
            raise EetuneError(f"token id {token} is outside the vocabulary [0, {self.vocab_size})")
        self._token.fill_(token)
        return self.forward(self._token)

    def rewind(self, length: int) -> None:
        """Forget positions >= length; they are simply overwritten by the next forward."""
        if not 0 <= length <= self.length:
            raise EetuneError(f"cannot rewind to {length}: only {self.length} positions are filled")
        self.length = length

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_ids: Collection[int] = (),
        seed: int | None = None,
        on_token: Callable[[int], bool | None] | None = None,
    ) -> GenerationResult:
        """Generate up to max_new_tokens after prompt_ids (batch 1); see module `generate`."""
        if self.batch_size != 1:
            raise EetuneError(f"generate() decodes one sequence; this generator has batch_size {self.batch_size}")
        params = SamplingParams(temperature, top_k, top_p)
        tokens_in = self._as_tokens(prompt_ids)
        prompt_len = tokens_in.shape[1]
        _check_request_length(prompt_len, max_new_tokens, self.max_seq_len, "this generator's")
        if max_new_tokens == 0:
            return GenerationResult([], prompt_len, 0.0, 0.0, 0.0, "length")
        stop = frozenset(stop_ids)
        rng = None if params.greedy else make_rng(seed, self.device)

        with torch.inference_mode():
            t0 = time.perf_counter()
            token = int(sample(self.prefill(tokens_in), params, rng)[0])
            t1 = time.perf_counter()
            out = [token]
            halted = on_token is not None and bool(on_token(token))
            stopped_by: Literal["eos", "length", "callback"] = (
                "eos" if token in stop else "callback" if halted else "length"
            )
            while stopped_by == "length" and len(out) < max_new_tokens:
                token = int(sample(self.decode_step(token), params, rng)[0])
                out.append(token)
                halted = on_token is not None and bool(on_token(token))
                if token in stop:
                    stopped_by = "eos"
                elif halted:
                    stopped_by = "callback"
            t2 = time.perf_counter()

        decode_s = t2 - t1
        tokens_per_s = (len(out) - 1) / decode_s if len(out) > 1 else 0.0
        return GenerationResult(out, prompt_len, t1 - t0, decode_s, tokens_per_s, stopped_by)

    def _as_tokens(self, prompt_ids: Sequence[int] | Tensor) -> Tensor:
        tokens = prompt_ids if isinstance(prompt_ids, Tensor) else torch.tensor(list(prompt_ids), dtype=torch.long)
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise EetuneError("the prompt is empty: give at least one token id")
        if tokens.dtype != torch.long:
            raise EetuneError(f"token ids must be integers, got a {tokens.dtype} tensor")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size:
            raise EetuneError(f"prompt token ids must be in [0, {self.vocab_size}), the model's vocabulary")
        return tokens.to(self.device)


def generate(
    model: TransformerDecoder,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Collection[int] = (),
    seed: int | None = None,
    on_token: Callable[[int], bool | None] | None = None,
) -> GenerationResult:
    """Generate up to max_new_tokens after prompt_ids with a fresh KV cache sized to the request.

    temperature 0 is greedy; otherwise tokens are sampled with temperature/top-k/top-p from a
    private RNG seeded by `seed`. Stops early after emitting any token in stop_ids;
    `on_token` receives each new token as soon as it is chosen (streaming) and stops
    generation after it by returning True (e.g. a stop string appeared, the client left).
    """
    _check_supported(model)
    _check_request_length(len(prompt_ids), max_new_tokens, model.max_seq_len, "the model's")
    generator = Generator(model, max_seq_len=max(1, len(prompt_ids) + max_new_tokens))
    return generator.generate(
        prompt_ids,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_ids=stop_ids,
        seed=seed,
        on_token=on_token,
    )
