"""A decoder block as plain tensors, for decoding one token at a time with little overhead.

Decoding at batch 1 streams every weight once per token; what the matmuls cannot hide is the
per-op cost of everything around them. torchtune's block spends ~70 ops and a dozen module
calls per token (RoPE alone is ~15 ops); the same math on the block's own tensors takes ~30.
On SmolLM2 that is ~1,200 fewer ops per token. Only plain Llama-style blocks qualify (RMSNorm,
interleaved RoPE, SwiGLU, no q/k norm, no scales, plain linears); others keep the module path.

A block split for tensor parallel (eetune.parallel.inference_tp) holds this rank's heads and
hidden units and names its group as `tp_group`: the two row-split projections' partial sums are
all-reduced over it, as the module path's hooks do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.modules import (
    FeedForward,
    MultiHeadAttention,
    RMSNorm,
    RotaryPositionalEmbeddings,
    TransformerSelfAttentionLayer,
)

from eetune.infer.kv_cache import LayerKVCache

# RoPE modules whose cache holds (cos, sin) pairs per position for interleaved pairs of dims.
_INTERLEAVED_ROPE = (RotaryPositionalEmbeddings, Llama3ScaledRoPE)


class FastBlock:
    """The tensors of one torchtune `TransformerSelfAttentionLayer`; `__call__` is its forward.

    Holds references, not copies: the weights stay the module's own (and its dtype/device); only
    a bf16 model's two norm scales are held as fp32 copies.
    """

    def __init__(self, layer: TransformerSelfAttentionLayer) -> None:
        attn: MultiHeadAttention = layer.attn
        self.n_h, self.n_kv, self.h_d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        # The norms run in fp32 (as torchtune's): an fp32 scale lets torch take its fused kernel,
        # which a bf16 scale beside fp32 states does not (40 vs 21 us a call at batch 1, same result).
        # For an fp32 model .float() is the module's own tensor; for bf16, a copy of `dim` floats.
        self.sa_norm = (layer.sa_norm.normalized_shape, layer.sa_norm.scale.float(), layer.sa_norm.eps)
        self.mlp_norm = (layer.mlp_norm.normalized_shape, layer.mlp_norm.scale.float(), layer.mlp_norm.eps)
        self.q = (attn.q_proj.weight, attn.q_proj.bias)
        self.k = (attn.k_proj.weight, attn.k_proj.bias)
        self.v = (attn.v_proj.weight, attn.v_proj.bias)
        self.o = (attn.output_proj.weight, attn.output_proj.bias)
        self.w1, self.w2, self.w3 = layer.mlp.w1.weight, layer.mlp.w2.weight, layer.mlp.w3.weight
        self.tp_group = getattr(layer, "tp_group", None)
        # e^(i * pos * theta) per position and pair of dims: RoPE is one complex product.
        self.rope = None if attn.pos_embeddings is None else torch.view_as_complex(attn.pos_embeddings.cache.float())

    @staticmethod
    def supports(layer: nn.Module) -> bool:
        if type(layer) is not TransformerSelfAttentionLayer or type(layer.attn) is not MultiHeadAttention:
            return False
        attn, mlp = layer.attn, layer.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.output_proj)
        return (
            all(type(m) is nn.Linear for m in linears)
            and attn.q_norm is None
            and attn.k_norm is None
            and (attn.pos_embeddings is None or type(attn.pos_embeddings) in _INTERLEAVED_ROPE)
            and type(layer.sa_norm) is RMSNorm
            and type(layer.mlp_norm) is RMSNorm
            and type(layer.sa_scale) is nn.Identity
            and type(layer.mlp_scale) is nn.Identity
            and type(mlp) is FeedForward
            and type(mlp.activation) is nn.SiLU
            and all(type(m) is nn.Linear and m.bias is None for m in (mlp.w1, mlp.w2, mlp.w3))
        )

    def __call__(self, x: Tensor, input_pos: Tensor, kv_len: int, mask: Tensor | None, cache: LayerKVCache) -> Tensor:
        """x [b, s, dim] at positions input_pos ([s] or per row [b, s]); same math as torchtune's block forward."""
        b, s, _ = x.shape
        n_h, n_kv, h_d = self.n_h, self.n_kv, self.h_d
        h = _rms_norm(x, *self.sa_norm)
        q = F.linear(h, *self.q).view(b, s, n_h, h_d)
        k = F.linear(h, *self.k).view(b, s, n_kv, h_d)
        v = F.linear(h, *self.v).view(b, s, n_kv, h_d)
        if self.rope is not None:
            # torchtune rotates in fp32 and casts back; q and k heads go through together.
            qk = torch.cat((q, k), dim=2).float().view(b, s, n_h + n_kv, h_d // 2, 2)
            # input_pos is [s] (shared) or [b, s] (each row at its own positions).
            rotated = torch.view_as_complex(qk) * self.rope[input_pos].view(-1, s, 1, h_d // 2)
            qk = torch.view_as_real(rotated).flatten(3).to(x.dtype)
            q, k = qk[:, :, :n_h], qk[:, :, n_h:]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cache.write(input_pos, k, v)
        keys, values = cache.read(kv_len)
        if s == 1:
            # Query heads sharing a KV head form one block of queries (see generate.attention_forward).
            out = F.scaled_dot_product_attention(q.reshape(b, n_kv, n_h // n_kv, h_d), keys, values, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, is_causal=mask is None, enable_gqa=n_h != n_kv
            ).transpose(1, 2)
        x = x + self._reduce(F.linear(out.reshape(b, s, n_h * h_d), *self.o))
        h = _rms_norm(x, *self.mlp_norm)
        return x + self._reduce(F.linear(F.silu(F.linear(h, self.w1)) * F.linear(h, self.w3), self.w2))

    def _reduce(self, partial: Tensor) -> Tensor:
        if self.tp_group is not None:
            dist.all_reduce(partial, group=self.tp_group)
        return partial


def _rms_norm(x: Tensor, shape: tuple[int, ...], scale: Tensor, eps: float) -> Tensor:
    """torchtune's RMSNorm: computed in fp32, cast back."""
    return F.rms_norm(x.float(), shape, scale, eps).to(x.dtype)
