"""Baseline MHA / GQA / MQA with the same call signature as MultiHeadLatentAttention.

It exists so every comparison with MLA (cache size, speed, quality) runs in the same code: same
query shapes (N + R per head, RoPE on the last R), same masking, same cache protocol, only the
cached tensors differ: G key/value heads of N + R and V features instead of one latent.

The K/V cache is head-major, [B,G,S,K] and [B,G,S,V] (cache.KVCache): this step's keys and
values are moved to that layout ([B,G,T,...], a few KB per decode step) before they are written,
so every read of the cache, per block in flash-decoding or whole in the reference path, is a dot
with B,G as leading batch dims over [S,K] matrices as they lie in memory.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mla_jax.cache import KVCache, load_float, write_cache
from mla_jax.config.model import ModelConfig
from mla_jax.paged_cache import PagedLayerCache, as_contiguous, write_paged
from mla_jax.layers.flash_attention import flash_attention
from mla_jax.layers.flash_decode import (grouped_decode_partials, normalize,
                                         split_over_sequence)
from mla_jax.layers.masking import (masked_softmax, query_positions, reference_context,
                                    resolve_attn_impl)
from mla_jax.layers.paged_attention import pages_per_block, paged_grouped_decode_partials
from mla_jax.layers.params import ParamSpec, ParamSpecs, cast, declare, projection
from mla_jax.layers.precision import einsum_f32
from mla_jax.layers.rope import apply_rope, rope_cos_sin
from mla_jax.sharding import sequence_split


def mha_specs(config: ModelConfig) -> ParamSpecs:
  """q_proj [D,H,N+R], k_proj [D,G,N+R], v_proj [D,G,V], o_proj [H,V,D]; G = config.kv_heads.
  With model.qkv_bias (Qwen2) also q_bias [H,N+R], k_bias [G,N+R], v_bias [G,V], from zeros."""
  cfg = config
  d, h, g, v, k_dim = cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.v_head_dim, cfg.qk_head_dim
  specs = {"q_proj": projection(cfg, (d, h, k_dim), ("embed", "heads", "head_dim")),
           "k_proj": projection(cfg, (d, g, k_dim), ("embed", "kv_heads", "head_dim")),
           "v_proj": projection(cfg, (d, g, v), ("embed", "kv_heads", "head_dim")),
           "o_proj": projection(cfg, (h, v, d), ("heads", "head_dim", "embed"))}
  if cfg.qkv_bias:
    dtype = str(jnp.dtype(cfg.param_dtype))
    zeros = nn.initializers.zeros
    specs.update({"q_bias": ParamSpec((h, k_dim), ("heads", "head_dim"), zeros, dtype),
                  "k_bias": ParamSpec((g, k_dim), ("kv_heads", "head_dim"), zeros, dtype),
                  "v_bias": ParamSpec((g, v), ("kv_heads", "head_dim"), zeros, dtype)})
  return specs


def mha_attention(config: ModelConfig, params: dict, x: jax.Array, *,
                  cache: Optional[KVCache] = None, lengths: Optional[jax.Array] = None,
                  num_tokens: Optional[jax.Array] = None, attn_impl: str = "auto",
                  absorbed: Optional[dict] = None, record=None
                  ) -> tuple[jax.Array, Optional[KVCache]]:
  """MHA/GQA/MQA as a pure function: x [B,T,D] -> (y [B,T,D], updated KVCache or None), with
  the weights of mha_specs; the arguments mean what they mean for mla_attention (absorbed and
  record are accepted for the same signature: this layer has no absorbed weights).

  attn_impl: 'flash' (the default with a cache, via 'auto') walks the K/V cache in blocks with
  the same flash-decoding loop as MLA, so comparisons stay fair; 'flash_attention' (the default
  for long sequences without a cache) is the same blocked attention with its own backward pass
  as MLA's; 'naive' and 'absorbed' (no latent to absorb into: the same thing here) run the plain
  einsum path over the whole cache.
  """
  del absorbed, record
  cfg = config
  b, t, d = x.shape
  h, g, n, v = cfg.num_heads, cfg.kv_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
  k_dim = cfg.qk_head_dim
  impl = resolve_attn_impl(attn_impl, t, cache is not None)
  dtype = jnp.dtype(cfg.dtype)
  x = x.astype(dtype)
  positions, num_tokens = query_positions(b, t, cache is not None, lengths, num_tokens)  # [B,T]
  cos, sin = rope_cos_sin(positions, cfg)  # [B,T,R/2]

  def with_rope(z: jax.Array) -> jax.Array:  # [B,T,heads,N+R], rotate the last R features
    return jnp.concatenate([z[..., :n], apply_rope(z[..., n:], cos, sin, cfg.rope_interleave)],
                           axis=-1)

  def bias(name: str) -> jax.Array:  # [heads, features], or 0 without model.qkv_bias
    return cast(params[name], cfg) if cfg.qkv_bias else jnp.zeros((), dtype)

  q = with_rope(jnp.einsum("BTD,DHK->BTHK", x, cast(params["q_proj"], cfg)) + bias("q_bias"))
  k = with_rope(jnp.einsum("BTD,DGK->BTGK", x, cast(params["k_proj"], cfg)) + bias("k_bias"))
  val = jnp.einsum("BTD,DGV->BTGV", x, cast(params["v_proj"], cfg)) + bias("v_bias")

  new = KVCache(k=jnp.swapaxes(k, 1, 2), v=jnp.swapaxes(val, 1, 2))  # [B,G,T,K], [B,G,T,V]
  if cache is None:
    new_cache = None
  elif isinstance(cache, PagedLayerCache):  # written through the page table
    new_cache = write_paged(new, cache, lengths, num_tokens)
  else:
    new_cache = write_cache(new, cache, lengths)
  if impl == "flash_attention":  # blocked, linear memory (layers/flash_attention.py)
    if new_cache is None:
      keys, values, kv_lengths = k, val, None  # [B,T,G,K], [B,T,G,V]
    else:
      contiguous = (as_contiguous(new_cache) if isinstance(new_cache, PagedLayerCache)
                    else new_cache)
      keys, values = (jnp.swapaxes(load_float(x, dtype), 1, 2)  # [B,S,G,K], [B,S,G,V]
                      for x in (contiguous.k, contiguous.v))
      kv_lengths = lengths + num_tokens
    out = flash_attention(q, keys, values, scale=cfg.softmax_scale,
                          query_offsets=None if cache is None else lengths,
                          kv_lengths=kv_lengths, block_q=cfg.flash_block_q,
                          block_k=cfg.flash_block_k).astype(dtype)  # [B,T,H,V]
    return jnp.einsum("BTHV,HVD->BTD", out, cast(params["o_proj"], cfg)), new_cache
  q = q.reshape(b, t, g, h // g, k_dim)  # query heads grouped under their key/value head
  if impl == "flash":
    keys = new if cache is None else new_cache
    kv_lengths = jnp.full((b,), t, jnp.int32) if cache is None else lengths + num_tokens
    partials = functools.partial(grouped_decode_partials, scale=cfg.softmax_scale,
                                 block_size=cfg.decode_block_size)
    split = None if cache is None else sequence_split()
    if isinstance(keys, PagedLayerCache):
      out = normalize(*paged_grouped_decode_partials(
          q, keys.pool.k, keys.pool.v, keys.page_table, kv_lengths, positions,
          scale=cfg.softmax_scale,
          pages_per_block=pages_per_block(cfg.decode_block_size, keys.page_size))[1:])
    elif split is None:
      out = normalize(*partials(q, keys.k, keys.v, kv_lengths, positions)[1:])
    else:
      out = split_over_sequence(partials, (q,), (keys.k, keys.v), kv_lengths, positions,
                                seq_axis=KVCache.seq_axis, **split)
    out = out.astype(dtype)  # [B,T,G,J,V]
  else:
    contiguous = (as_contiguous(new_cache) if isinstance(new_cache, PagedLayerCache)
                  else new_cache)
    cached = None if new_cache is None else jax.tree_util.tree_map(load_float, contiguous)
    keys, mask = reference_context(new, cached, lengths, num_tokens, positions, dtype)
    scores = einsum_f32("BTGJK,BGSK->BGJTS", q, keys.k)
    scores = scores.reshape(b, h, t, -1)  # [B,H,T,S], head = g * (H/G) + j
    probs = masked_softmax(scores * cfg.softmax_scale, mask).reshape(b, g, h // g, t, -1)
    out = einsum_f32("BGJTS,BGSV->BTGJV", probs.astype(dtype), keys.v).astype(dtype)
  return jnp.einsum("BTHV,HVD->BTD", out.reshape(b, t, h, v), cast(params["o_proj"], cfg)), \
      new_cache


class MultiHeadAttention(nn.Module):
  """x [B,T,D] -> (y [B,T,D], updated KVCache or None): mha_attention as a Linen module;
  G = config.kv_heads key/value heads."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, *, cache: Optional[KVCache] = None,
               lengths: Optional[jax.Array] = None, num_tokens: Optional[jax.Array] = None,
               attn_impl: str = "auto") -> tuple[jax.Array, Optional[KVCache]]:
    return mha_attention(self.config, declare(self, mha_specs(self.config)), x, cache=cache,
                         lengths=lengths, num_tokens=num_tokens, attn_impl=attn_impl)
