"""Decoder-only Transformer LM: tokens [B,T] (+ cache) -> logits [B,T,V] (+ cache).

Pre-norm blocks of attention (MLA or a baseline) and a SwiGLU MLP or DeepSeekMoE, a final
RMSNorm and an untied LM head, as in DeepSeek-V2/V3. Used functionally: the cache is an argument and a return
value, never hidden module state, so one jitted function serves prefill and decode.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mla_jax.cache import Cache, LayerCache
from mla_jax.config import ModelConfig
from mla_jax.layers.attention import MultiHeadAttention
from mla_jax.layers.mla import MultiHeadLatentAttention
from mla_jax.layers.mlp import SwiGLU
from mla_jax.layers.moe import DeepSeekMoE
from mla_jax.layers.norms import RMSNorm
from mla_jax.layers.precision import einsum_f32
from mla_jax.sharding import constrain


class DecoderBlock(nn.Module):
  config: ModelConfig
  layer: int = 0  # decides dense MLP or DeepSeekMoE (first_k_dense_replace)

  @nn.compact
  def __call__(self, x: jax.Array, cache: Optional[LayerCache], lengths: Optional[jax.Array],
               num_tokens: Optional[jax.Array], attn_impl: str
               ) -> tuple[jax.Array, Optional[LayerCache]]:  # x [B,T,D]
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    attention = MultiHeadLatentAttention if cfg.attention == "mla" else MultiHeadAttention
    normed = RMSNorm(cfg.rms_norm_eps, dtype, cfg.param_dtype, name="input_layernorm")(x)
    attn_out, cache = attention(cfg, name="self_attn")(
        normed, cache=cache, lengths=lengths, num_tokens=num_tokens, attn_impl=attn_impl)
    x = x + attn_out
    normed = RMSNorm(cfg.rms_norm_eps, dtype, cfg.param_dtype, name="post_attention_layernorm")(x)
    mlp = DeepSeekMoE(cfg, name="mlp") if cfg.is_moe_layer(self.layer) else SwiGLU(cfg, name="mlp")
    return x + mlp(normed), cache


def _is_concrete(x: jax.Array) -> bool:
  return not isinstance(x, jax.core.Tracer)


class Transformer(nn.Module):
  """`logits, cache = model.apply({'params': p}, tokens, cache=None, attn_impl='auto')`.

  Without a cache: a causal forward over tokens [B,T]; returns (logits [B,T,V] float32, None).
  With a cache: the tokens go after each sequence's cached length, positions come from the cache,
  and the returned cache holds them. num_tokens [B] (optional, with a cache) says how many of each
  row's T tokens are real, for prompts of different lengths padded on the right.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, cache: Optional[Cache] = None, attn_impl: str = "auto",
               num_tokens: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[Cache]]:
    cfg = self.config
    self._check_inputs(tokens, cache, num_tokens)
    b, t = tokens.shape
    if cache is not None and num_tokens is None:
      num_tokens = jnp.full((b,), t, jnp.int32)
    lengths = None if cache is None else cache.lengths

    embed = self.param("embed_tokens", nn.initializers.normal(cfg.initializer_range),
                       (cfg.vocab_size, cfg.hidden_size), jnp.dtype(cfg.param_dtype))  # [V,D]
    batch_axis = "batch" if cache is None else "cache_batch"  # decode batches follow the cache
    x = jnp.take(embed, tokens, axis=0).astype(jnp.dtype(cfg.dtype))  # [B,T,D]
    new_layers = []
    for i in range(cfg.num_layers):
      layer_cache = None if cache is None else cache.layers[i]
      x, layer_cache = DecoderBlock(cfg, i, name=f"layers_{i}")(x, layer_cache, lengths,
                                                                 num_tokens, attn_impl)
      new_layers.append(layer_cache)
    x = RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype), cfg.param_dtype, name="norm")(x)
    lm_head = self.param("lm_head", nn.initializers.normal(cfg.initializer_range),
                         (cfg.hidden_size, cfg.vocab_size), jnp.dtype(cfg.param_dtype))  # [D,V]
    logits = constrain(einsum_f32("BTD,DV->BTV", x, lm_head.astype(x.dtype)),
                       (batch_axis, None, "vocab"))
    if cache is None:
      return logits, None
    return logits, Cache(layers=tuple(new_layers), lengths=cache.lengths + num_tokens)

  def _check_inputs(self, tokens: jax.Array, cache: Optional[Cache],
                    num_tokens: Optional[jax.Array]) -> None:
    """Shape checks always; value checks (token ids, cache room) when the arrays are concrete,
    since under jit a gather would clamp a bad id and a scatter would drop an overflow silently."""
    cfg = self.config
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be an integer array [B,T], got {tokens.dtype}{tokens.shape}")
    b, t = tokens.shape
    limit = cfg.max_seq_len if cache is None else cache.max_len
    if t > limit:
      raise ValueError(f"tokens has T={t} positions, more than the "
                       f"{'model.max_seq_len' if cache is None else 'cache max_len'} ({limit})")
    if num_tokens is not None and cache is None:
      raise ValueError("num_tokens is only meaningful with a cache (ragged prefill)")
    if cache is not None and cache.batch_size != b:
      raise ValueError(f"tokens batch {b} does not match the cache's batch {cache.batch_size}")
    if _is_concrete(tokens) and t:
      ids = np.asarray(tokens)
      if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"token ids must be in [0, vocab_size={cfg.vocab_size}), got "
                         f"[{ids.min()}, {ids.max()}]")
    if cache is not None and _is_concrete(cache.lengths) and (
        num_tokens is None or _is_concrete(num_tokens)):
      added = np.full((b,), t) if num_tokens is None else np.asarray(num_tokens)
      if added.min() < 0 or added.max() > t:
        raise ValueError(f"num_tokens must be in [0, T={t}], got {added.tolist()}")
      total = np.asarray(cache.lengths) + added
      if total.max() > cache.max_len:
        raise ValueError(f"cache overflow: lengths + new tokens = {total.tolist()} exceeds the "
                         f"cache's max_len {cache.max_len}")
