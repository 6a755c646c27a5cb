"""The decode cache as an explicit pytree: MLA's latent per token, or the baselines' K/V.

MLA caches, per layer and token, only c_kv (after kv_a_layernorm) and the shared k_rope (after
RoPE): (kv_lora_rank + qk_rope_head_dim) elements, no head axis, no padding. The per-sequence
lengths say which slots hold tokens; attention never reads a slot at or beyond its sequence's length.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
from flax import struct

from mla_jax.config import ModelConfig


@struct.dataclass
class LatentCache:
  """One MLA layer's cache."""

  c_kv: jax.Array  # [B,S,C] normalised latent
  k_rope: jax.Array  # [B,S,R] rotated shared RoPE key


@struct.dataclass
class KVCache:
  """One baseline (MHA/GQA/MQA) layer's cache."""

  k: jax.Array  # [B,S,G,N+R] keys, RoPE already applied to their last R features
  v: jax.Array  # [B,S,G,V]


LayerCache = Union[LatentCache, KVCache]


@struct.dataclass
class Cache:
  """All layers' caches plus how many tokens each sequence holds."""

  layers: tuple[LayerCache, ...]
  lengths: jax.Array  # [B] int32

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]

  @property
  def max_len(self) -> int:
    return jax.tree_util.tree_leaves(self.layers[0])[0].shape[1]


def _check_sizes(config: ModelConfig, batch_size: int, max_len: int) -> None:
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f"batch_size={batch_size!r} is invalid: must be a positive integer")
  if isinstance(max_len, bool) or not isinstance(max_len, int) or not 0 < max_len <= config.max_seq_len:
    raise ValueError(f"max_len={max_len!r} is invalid: must be in [1, model.max_seq_len="
                     f"{config.max_seq_len}]")


def init_layer_cache(config: ModelConfig, batch_size: int, max_len: int,
                     dtype: Optional[jnp.dtype] = None) -> LayerCache:
  """An empty cache for one attention layer (a LatentCache for MLA, else a KVCache)."""
  _check_sizes(config, batch_size, max_len)
  dtype = jnp.dtype(config.dtype if dtype is None else dtype)
  b, s = batch_size, max_len
  if config.attention == "mla":
    return LatentCache(c_kv=jnp.zeros((b, s, config.kv_lora_rank), dtype),
                       k_rope=jnp.zeros((b, s, config.qk_rope_head_dim), dtype))
  return KVCache(k=jnp.zeros((b, s, config.kv_heads, config.qk_head_dim), dtype),
                 v=jnp.zeros((b, s, config.kv_heads, config.v_head_dim), dtype))


def init_cache(config: ModelConfig, batch_size: int, max_len: int,
               dtype: Optional[jnp.dtype] = None) -> Cache:
  """An empty cache for `batch_size` sequences of up to `max_len` tokens (dtype: config.dtype)."""
  layers = tuple(init_layer_cache(config, batch_size, max_len, dtype)
                 for _ in range(config.num_layers))
  return Cache(layers=layers, lengths=jnp.zeros((batch_size,), jnp.int32))


def cache_bytes(cache: Cache) -> int:
  """Bytes of every array in the cache, the length vector included."""
  return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(cache))


def write_tokens(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  """buffer [B,S,...] with new [B,T,...] written at slots start[b] .. start[b]+T-1.

  A scatter rather than dynamic_update_slice: the latter clamps a start near the end and would
  overwrite valid tokens; here writes past S are dropped (only ever padding of a ragged batch).
  """
  b, t = new.shape[:2]
  slots = start[:, None] + jnp.arange(t, dtype=start.dtype)  # [B,T]
  rows = jnp.arange(b)[:, None]  # [B,1]
  return buffer.at[rows, slots].set(new.astype(buffer.dtype), mode="drop")


def slot_mask(lengths: jax.Array, max_len: int) -> jax.Array:
  """[B,S] True where a slot holds one of the sequence's first `lengths[b]` tokens."""
  return jnp.arange(max_len)[None, :] < lengths[:, None]
