"""Baseline MHA / GQA / MQA with the same call signature as MultiHeadLatentAttention.

It exists so every comparison with MLA (cache size, speed, quality) runs in the same code: same
query shapes (N + R per head, RoPE on the last R), same masking, same cache protocol, only the
cached tensors differ: G key/value heads of N + R and V features instead of one latent.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mla_jax.cache import KVCache
from mla_jax.config import ModelConfig
from mla_jax.layers.masking import (attention_context, masked_softmax, query_positions,
                                    resolve_attn_impl)
from mla_jax.layers.params import weight
from mla_jax.layers.precision import einsum_f32
from mla_jax.layers.rope import apply_rope, rope_cos_sin


class MultiHeadAttention(nn.Module):
  """x [B,T,D] -> (y [B,T,D], updated KVCache or None); G = config.kv_heads key/value heads.

  attn_impl is accepted for a uniform signature; there is no latent to absorb into, so every
  value runs the one standard path.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, *, cache: Optional[KVCache] = None,
               lengths: Optional[jax.Array] = None, num_tokens: Optional[jax.Array] = None,
               attn_impl: str = "auto") -> tuple[jax.Array, Optional[KVCache]]:
    cfg = self.config
    b, t, d = x.shape
    h, g, n, v = cfg.num_heads, cfg.kv_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    k_dim = cfg.qk_head_dim
    resolve_attn_impl(attn_impl, t, cache is not None)  # validates the name
    dtype = jnp.dtype(cfg.dtype)
    x = x.astype(dtype)
    positions, num_tokens = query_positions(b, t, cache is not None, lengths, num_tokens)  # [B,T]
    cos, sin = rope_cos_sin(positions, cfg)  # [B,T,R/2]

    def with_rope(z: jax.Array) -> jax.Array:  # [B,T,heads,N+R], rotate the last R features
      return jnp.concatenate([z[..., :n], apply_rope(z[..., n:], cos, sin, cfg.rope_interleave)],
                             axis=-1)

    q = with_rope(jnp.einsum("BTD,DHK->BTHK", x, weight(self, "q_proj", (d, h, k_dim))))
    k = with_rope(jnp.einsum("BTD,DGK->BTGK", x, weight(self, "k_proj", (d, g, k_dim))))
    val = jnp.einsum("BTD,DGV->BTGV", x, weight(self, "v_proj", (d, g, v)))

    new_cache, keys, mask = attention_context(KVCache(k=k, v=val), cache, lengths, num_tokens,
                                              positions)
    k_all, v_all = keys.k.astype(dtype), keys.v.astype(dtype)  # [B,S,G,K], [B,S,G,V]
    q = q.reshape(b, t, g, h // g, k_dim)  # query heads grouped under their key/value head
    scores = einsum_f32("BTGJK,BSGK->BGJTS", q, k_all)
    scores = scores.reshape(b, h, t, -1)  # [B,H,T,S], head = g * (H/G) + j
    probs = masked_softmax(scores * cfg.softmax_scale, mask).reshape(b, g, h // g, t, -1)
    out = einsum_f32("BGJTS,BSGV->BTGJV", probs.astype(dtype), v_all).astype(dtype)
    y = jnp.einsum("BTHV,HVD->BTD", out.reshape(b, t, h, v), weight(self, "o_proj", (h, v, d)))
    return y, new_cache
