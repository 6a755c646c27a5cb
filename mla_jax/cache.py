"""The decode cache as an explicit pytree: MLA's latent per token, or the baselines' K/V.

MLA caches, per layer and token, only c_kv (after kv_a_layernorm) and the shared k_rope (after
RoPE): (kv_lora_rank + qk_rope_head_dim) elements, no head axis, no padding. The per-sequence
lengths say which slots hold tokens; attention never reads a slot at or beyond its sequence's length.

Storage: a float32 cache holds float32 arrays. A bfloat16 cache holds the bfloat16 values' bit
patterns as uint16 (same bytes): XLA's CPU compiler widens every bfloat16 operation to float32
(its float-normalization pass), and inside the decode loop that turns a block read of a bfloat16
cache into a float32 copy of the whole cache, hoisted out of the loop. From uint16 bits a block is
widened exactly with one shift (`load_float`), one block at a time. `store_float` / `load_float`
are the only two places that know it.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
from flax import struct

from mla_jax.config import ModelConfig


BF16_BITS = jnp.uint16  # how a bfloat16 cache array is stored


def storage_dtype(dtype) -> jnp.dtype:
  """The array dtype that holds cache values of `dtype` (bfloat16 -> uint16 bits)."""
  dtype = jnp.dtype(dtype)
  return jnp.dtype(BF16_BITS) if dtype == jnp.bfloat16 else dtype


def value_dtype(stored) -> jnp.dtype:
  """The dtype of the values a stored cache array holds (uint16 -> bfloat16)."""
  stored = jnp.dtype(stored)
  return jnp.dtype(jnp.bfloat16) if stored == BF16_BITS else stored


def store_float(x: jax.Array, stored) -> jax.Array:
  """x rounded to the cache's value dtype, in its storage dtype (bfloat16 as uint16 bits)."""
  stored = jnp.dtype(stored)
  if stored == BF16_BITS:
    return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), BF16_BITS)
  return x.astype(stored)


def load_float(stored: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Stored cache values as `dtype`; uint16 bfloat16 bits are widened exactly by a shift (cheap
  and vectorised on CPU, and needs no bfloat16 op). Use it on a block, not a whole cache."""
  if stored.dtype == BF16_BITS:
    wide = jax.lax.bitcast_convert_type(stored.astype(jnp.uint32) << 16, jnp.float32)
    return wide.astype(dtype)
  return stored.astype(dtype)


@struct.dataclass
class LatentCache:
  """One MLA layer's cache (see the module docstring for how bfloat16 is stored)."""

  c_kv: jax.Array  # [B,S,C] normalised latent
  k_rope: jax.Array  # [B,S,R] rotated shared RoPE key

  @property
  def dtype(self) -> jnp.dtype:
    """The dtype of the latent values (bfloat16 for a bfloat16 cache stored as bits)."""
    return value_dtype(self.c_kv.dtype)


@struct.dataclass
class KVCache:
  """One baseline (MHA/GQA/MQA) layer's cache."""

  k: jax.Array  # [B,S,G,N+R] keys, RoPE already applied to their last R features
  v: jax.Array  # [B,S,G,V]

  @property
  def dtype(self) -> jnp.dtype:
    return value_dtype(self.k.dtype)


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
  dtype = storage_dtype(config.kv_cache_dtype if dtype is None else dtype)
  b, s = batch_size, max_len
  if config.attention == "mla":
    return LatentCache(c_kv=jnp.zeros((b, s, config.kv_lora_rank), dtype),
                       k_rope=jnp.zeros((b, s, config.qk_rope_head_dim), dtype))
  return KVCache(k=jnp.zeros((b, s, config.kv_heads, config.qk_head_dim), dtype),
                 v=jnp.zeros((b, s, config.kv_heads, config.v_head_dim), dtype))


def init_cache(config: ModelConfig, batch_size: int, max_len: int,
               dtype: Optional[jnp.dtype] = None) -> Cache:
  """An empty cache for `batch_size` sequences of up to `max_len` tokens (dtype: the config's
  kv_cache_dtype, i.e. model.cache_dtype or else model.dtype)."""
  layers = tuple(init_layer_cache(config, batch_size, max_len, dtype)
                 for _ in range(config.num_layers))
  return Cache(layers=layers, lengths=jnp.zeros((batch_size,), jnp.int32))


def cache_bytes(cache: Cache) -> int:
  """Bytes of every array in the cache, the length vector included."""
  return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(cache))


def write_tokens(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  """buffer [B,S,...] with new [B,T,...] written at slots start[b] .. start[b]+T-1.

  new is converted to the buffer's storage (store_float). A scatter rather than
  dynamic_update_slice: the latter clamps a start near the end and would overwrite valid tokens;
  here writes past S are dropped (only ever padding of a ragged batch). Into a donated buffer XLA
  performs it in place (tests check the compiled step for a copy of the cache).
  """
  b, t = new.shape[:2]
  slots = start[:, None] + jnp.arange(t, dtype=start.dtype)  # [B,T]
  rows = jnp.arange(b)[:, None]  # [B,1]
  return buffer.at[rows, slots].set(store_float(new, buffer.dtype), mode="drop")


def slot_mask(lengths: jax.Array, max_len: int) -> jax.Array:
  """[B,S] True where a slot holds one of the sequence's first `lengths[b]` tokens."""
  return jnp.arange(max_len)[None, :] < lengths[:, None]
