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

A quantized cache (cache_dtype int8 or int4, MLA only) stores c_kv as int8 [B,S,C] or packed
int4 pairs uint8 [B,S,C/2] with one float32 scale per token c_kv_scale [B,S,1]
(mla_jax/quantization.py), and k_rope as bfloat16 bits: RoPE keys carry the positions, which are
sensitive to rounding. Tokens are quantized when written (`encode_latent`); the flash-decoding
loop dequantizes one block at a time.
"""

from __future__ import annotations

from typing import ClassVar, Optional, Union

import jax
import jax.numpy as jnp
from flax import struct

from mla_jax.config.model import ModelConfig
from mla_jax.quantization import dequantize, quantize


BF16_BITS = jnp.uint16  # how a bfloat16 cache array is stored


def storage_dtype(dtype) -> jnp.dtype:
  """The array dtype that holds cache values of `dtype` (bfloat16 -> uint16 bits)."""
  dtype = jnp.dtype(dtype)
  return jnp.dtype(BF16_BITS) if dtype == jnp.bfloat16 else dtype


def value_dtype(stored) -> jnp.dtype:
  """The dtype of the values a stored cache array holds (uint16 -> bfloat16, packed uint8 ->
  int4)."""
  stored = jnp.dtype(stored)
  return {jnp.dtype(BF16_BITS): jnp.dtype(jnp.bfloat16),
          jnp.dtype(jnp.uint8): jnp.dtype(jnp.int4)}.get(stored, stored)


def store_float(x: jax.Array, stored) -> jax.Array:
  """x rounded to the cache's value dtype, in its storage dtype (bfloat16 as uint16 bits)."""
  stored = jnp.dtype(stored)
  if x.dtype == stored:  # already in storage form (e.g. encoded by encode_latent)
    return x
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

  seq_axis: ClassVar[int] = 1  # the token axis S of every array: [B,S,...]

  c_kv: jax.Array  # [B,S,C] normalised latent (int4: uint8 [B,S,C/2], two values per byte)
  k_rope: jax.Array  # [B,S,R] rotated shared RoPE key
  c_kv_scale: Optional[jax.Array] = None  # [B,S,1] float32, int8/int4 caches only

  @property
  def dtype(self) -> jnp.dtype:
    """The dtype of the latent values: float32, bfloat16 (stored as bits), int8 or int4."""
    return value_dtype(self.c_kv.dtype)

  @property
  def quantized(self) -> bool:
    return self.c_kv_scale is not None


@struct.dataclass
class KVCache:
  """One baseline (MHA/GQA/MQA) layer's cache, head-major: each key/value head's tokens lie
  contiguously, so a block of S slots is a [S,K] matrix per head and the decode dots read it as
  it lies (batch dims B,G leading). The token-major [B,S,G,K] layout made XLA:CPU transpose
  every block before its dot; `mla-jax bench decode` measures both layouts (its "Baseline
  key-cache layout" table)."""

  seq_axis: ClassVar[int] = 2  # the token axis S of both arrays: [B,G,S,...]

  k: jax.Array  # [B,G,S,N+R] keys, RoPE already applied to their last R features
  v: jax.Array  # [B,G,S,V]

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
    layer = self.layers[0]
    return jax.tree_util.tree_leaves(layer)[0].shape[layer.seq_axis]


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
  kind = config.kv_cache_dtype if dtype is None else str(jnp.dtype(dtype)) if not isinstance(
      dtype, str) else dtype
  b, s = batch_size, max_len
  if kind in ("int8", "int4"):
    if config.attention != "mla":
      raise ValueError(f"cache dtype {kind} quantizes MLA's latent; attention={config.attention}"
                       " caches K/V: use float32 or bfloat16")
    int4 = kind == "int4"
    return LatentCache(
        c_kv=jnp.zeros((b, s, config.kv_lora_rank // 2 if int4 else config.kv_lora_rank),
                       jnp.uint8 if int4 else jnp.int8),
        k_rope=jnp.zeros((b, s, config.qk_rope_head_dim), BF16_BITS),
        c_kv_scale=jnp.ones((b, s, 1), jnp.float32))
  dtype = storage_dtype(kind)
  if config.attention == "mla":
    return LatentCache(c_kv=jnp.zeros((b, s, config.kv_lora_rank), dtype),
                       k_rope=jnp.zeros((b, s, config.qk_rope_head_dim), dtype))
  return KVCache(k=jnp.zeros((b, config.kv_heads, s, config.qk_head_dim), dtype),  # [B,G,S,K]
                 v=jnp.zeros((b, config.kv_heads, s, config.v_head_dim), dtype))  # [B,G,S,V]


def init_cache(config: ModelConfig, batch_size: int, max_len: int,
               dtype: Optional[jnp.dtype] = None) -> Cache:
  """An empty cache for `batch_size` sequences of up to `max_len` tokens, in the config's
  kv_cache_dtype (model.cache_dtype or else model.dtype), stored as: float32 arrays; bfloat16 as
  its uint16 bit patterns (read with load_float; see the module docstring); int8 / int4 (packed
  two per uint8) latents with a float32 scale per token and a bfloat16 (uint16) RoPE key.
  MLA layers get a LatentCache (c_kv [B,S,C], k_rope [B,S,R]); MHA/GQA/MQA layers a KVCache,
  head-major (k [B,G,S,K], v [B,G,S,V])."""
  layers = tuple(init_layer_cache(config, batch_size, max_len, dtype)
                 for _ in range(config.num_layers))
  return Cache(layers=layers, lengths=jnp.zeros((batch_size,), jnp.int32))


def encode_latent(new: LatentCache, like: LatentCache) -> LatentCache:
  """New tokens' float entries [B,T,...] in the storage of the cache `like` (quantized when it
  is; floats are converted by write_tokens)."""
  if not like.quantized:
    return new
  values, scale = quantize(new.c_kv, "int4" if like.c_kv.dtype == jnp.uint8 else "int8")
  return LatentCache(c_kv=values, k_rope=store_float(new.k_rope, like.k_rope.dtype),
                     c_kv_scale=scale)


def latent_values(cache: LatentCache) -> LatentCache:
  """The whole cache as float32 values (dequantized / widened): for the reference paths only,
  since it is a full-size copy."""
  c_kv = (dequantize(cache.c_kv, cache.c_kv_scale) if cache.quantized
          else load_float(cache.c_kv))
  return LatentCache(c_kv=c_kv, k_rope=load_float(cache.k_rope))


def cache_bytes_per_token(config: ModelConfig) -> int:
  """Exact bytes one token occupies in the whole model's decode cache: all layers' stored
  arrays (latent + scales + RoPE key, or K and V), from the cache structure itself."""
  layer = jax.eval_shape(lambda: init_layer_cache(config, 1, 1))
  return config.num_layers * sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(layer))


def cache_bytes(cache: Cache) -> int:
  """Bytes of every array in the cache, the length vector included."""
  return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(cache))


def write_tokens(buffer: jax.Array, new: jax.Array, start: jax.Array, axis: int = 1) -> jax.Array:
  """buffer with new written at slots start[b] .. start[b]+T-1 of its sequence axis `axis`.

  buffer [B,S,...] and new [B,T,...] for axis 1 (MLA's latent); buffer [B,G,S,...] and new
  [B,G,T,...] for axis 2 (the baselines' head-major K/V): the axes between B and S are written
  whole. new is converted to the buffer's storage (store_float). A scatter rather than
  dynamic_update_slice: the latter clamps a start near the end and would overwrite valid tokens;
  here writes past S are dropped (only ever padding of a ragged batch). Into a donated buffer XLA
  performs it in place (tests check the compiled step for a copy of the cache).
  """
  b, t = new.shape[0], new.shape[axis]
  between = new.shape[1:axis]  # e.g. (G,): every index of these axes is written
  rows = jnp.arange(b).reshape((b,) + (1,) * axis)  # [B,1..,1]
  middle = [jnp.arange(n).reshape((1,) * (i + 1) + (n,) + (1,) * (axis - i - 1))
            for i, n in enumerate(between)]  # each [1,..,n,..,1]
  slots = (start.reshape((b,) + (1,) * axis)
           + jnp.arange(t, dtype=start.dtype).reshape((1,) * axis + (t,)))  # [B,1..,T]
  return buffer.at[(rows, *middle, slots)].set(store_float(new, buffer.dtype), mode="drop")


def slot_mask(lengths: jax.Array, max_len: int) -> jax.Array:
  """[B,S] True where a slot holds one of the sequence's first `lengths[b]` tokens."""
  return jnp.arange(max_len)[None, :] < lengths[:, None]
