"""The decode cache and its storage format: what is stored per token, how, and how it is written
and read back. The attention layers and flash-decoding see the cache only through this module.

MLA caches, per layer and token, only c_kv (after kv_a_layernorm) and the shared k_rope (after
RoPE): (kv_lora_rank + qk_rope_head_dim) elements, no head axis, no padding. The per-sequence
lengths say which slots hold tokens; attention never reads a slot at or beyond its sequence's
length.

Storage (docs/decode.md). A float32 cache holds float32 arrays. A bfloat16 cache holds the
bfloat16 values' bit patterns as uint16 (same bytes): XLA's CPU compiler widens every bfloat16
operation to float32, and inside the decode loop that would turn a block read of a bfloat16
cache into a float32 copy of the whole cache, hoisted out of the loop. From uint16 bits a block
is widened exactly with one shift (`load_float`), one block at a time. `store_float` /
`load_float` are the only two places that know it.

Quantized latents (docs/quantized-cache.md; cache_dtype int8 or int4, MLA only): c_kv is stored
as int8 [B,S,C] or packed int4 pairs uint8 [B,S,C/2] with one float32 scale per token
c_kv_scale [B,S,1], and k_rope as bfloat16 bits, because RoPE keys carry the positions, which
are sensitive to rounding. Tokens are quantized when written (`encode_latent`); flash-decoding
dequantizes one block at a time through `latent_operand`'s block decoder.

Writes: `write_cache` puts a step's entries at each sequence's own offset (`write_tokens`, a
scatter that XLA performs in place into a donated buffer). Empty caches are made per attention
kind by mla_jax.kinds (init_cache), which knows which layer uses which cache type.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional, TypeVar, Union

import jax
import jax.numpy as jnp
from flax import struct

from mla_jax.config.model import ModelConfig


# ---- the storage codec ---------------------------------------------------------------------

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


# int8 and int4 latents: symmetric, one float32 scale per token. A token's latent c [C] is
# stored as round(c / scale) with scale = max|c| / qmax, so every stored value lies in
# [-qmax, qmax] and dequantization is q * scale; an all-zero row gets scale 1, never 0, so no NaN
# or inf ever comes out. int4 values are packed two per byte: element 2i in the low nibble, 2i+1
# in the high one, as two's-complement nibbles; uint8 [..., C/2]. One scale per token rather
# than per group of the latent width: the attention logits sum C products, which averages the
# per-element error, and per-group scales would cost bytes per token in every layer
# (docs/quantized-cache.md gives the error and the bytes; tests/test_quantization.py checks them).
QMAX = {"int8": 127, "int4": 7}


def quantize(x: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
  """x [..., C] float -> (values, scale [..., 1] float32).

  values: int8 [..., C] for kind 'int8'; uint8 [..., C/2] (two int4 per byte) for 'int4'.
  Raises ValueError for another kind, or for int4 with an odd C.
  """
  if kind not in QMAX:
    raise ValueError(f"quantized cache kind={kind!r} is invalid: allowed {', '.join(QMAX)}")
  if kind == "int4" and x.shape[-1] % 2:
    raise ValueError(f"int4 packs two values per byte: kv_lora_rank={x.shape[-1]} must be even")
  x = x.astype(jnp.float32)
  qmax = QMAX[kind]
  absmax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)  # [...,1]
  scale = jnp.where(absmax > 0, absmax / qmax, 1.0)  # an all-zero row: scale 1, values 0
  q = jnp.clip(jnp.round(x / scale), -qmax, qmax).astype(jnp.int8)  # [...,C]
  if kind == "int8":
    return q, scale
  nibbles = q.astype(jnp.uint8) & 0xF  # two's-complement low nibbles
  return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4), scale  # [...,C/2]


def dequantize(values: jax.Array, scale: jax.Array) -> jax.Array:
  """Inverse of quantize, float32 [..., C]; the kind follows values' dtype (int8 or uint8)."""
  return interleave(dequantize_planes(values, scale))


def dequantize_planes(values: jax.Array, scale: jax.Array) -> tuple[jax.Array, ...]:
  """dequantize, with the latent left as its planes (see interleave): int8 [..., C] -> one
  float32 plane [..., C]; packed int4 uint8 [..., C/2] -> two, the elements 0, 2, 4, ... (low
  nibbles) and 1, 3, 5, ... (high nibbles). Plain elementwise integer and float operations, so
  a kernel can decode a block with it where a lane interleave would not lower; the nibbles are
  widened to int32 before any bit operation."""
  if values.dtype == jnp.int8:
    return (values.astype(jnp.float32) * scale,)
  wide = values.astype(jnp.int32)  # [..., C/2]
  nibbles = (wide & 0xF, wide >> 4)  # two's-complement nibbles of elements 2i and 2i+1
  return tuple(((n ^ 8) - 8).astype(jnp.float32) * scale for n in nibbles)  # -> [-8, 7]


def interleave(planes: tuple[jax.Array, ...]) -> jax.Array:
  """Planes p = 0 .. P-1 of [..., C/P] -> [..., C], element j of plane p at j*P + p (one plane
  is returned as it is)."""
  if len(planes) == 1:
    return planes[0]
  stacked = jnp.stack(planes, axis=-1)  # [..., C/P, P]
  return stacked.reshape(stacked.shape[:-2] + (-1,))


def latent_planes(stored) -> int:
  """How many planes dequantize_planes makes of a stored latent of dtype `stored` (2 for packed
  int4, else 1)."""
  return 2 if jnp.dtype(stored) == jnp.uint8 else 1


# ---- the cache types -----------------------------------------------------------------------

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
  it lies (batch dims B,G leading). A token-major [B,S,G,K] layout makes XLA:CPU transpose
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


def init_latent_cache(config: ModelConfig, batch_size: int, max_len: int,
                      dtype: str) -> LatentCache:
  """An empty LatentCache [B,S,...] with values of `dtype` (float32, bfloat16, int8 or int4)."""
  b, s = batch_size, max_len
  if dtype in QMAX:
    int4 = dtype == "int4"
    return LatentCache(
        c_kv=jnp.zeros((b, s, config.kv_lora_rank // 2 if int4 else config.kv_lora_rank),
                       jnp.uint8 if int4 else jnp.int8),
        k_rope=jnp.zeros((b, s, config.qk_rope_head_dim), BF16_BITS),
        c_kv_scale=jnp.ones((b, s, 1), jnp.float32))
  stored = storage_dtype(dtype)
  return LatentCache(c_kv=jnp.zeros((b, s, config.kv_lora_rank), stored),
                     k_rope=jnp.zeros((b, s, config.qk_rope_head_dim), stored))


def init_kv_cache(config: ModelConfig, batch_size: int, max_len: int, dtype: str) -> KVCache:
  """An empty head-major KVCache (k [B,G,S,K], v [B,G,S,V]) with values of float `dtype`."""
  stored = storage_dtype(dtype)
  b, s = batch_size, max_len
  return KVCache(k=jnp.zeros((b, config.kv_heads, s, config.qk_head_dim), stored),  # [B,G,S,K]
                 v=jnp.zeros((b, config.kv_heads, s, config.v_head_dim), stored))  # [B,G,S,V]


def cache_bytes(cache: Cache) -> int:
  """Bytes of every array in the cache, the length vector included."""
  return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(cache))


# ---- encoding, writing and reading tokens --------------------------------------------------

def encode_latent(new: LatentCache, like: LatentCache) -> LatentCache:
  """New tokens' float entries [B,T,...] in the storage of the cache `like` (quantized when it
  is; floats are converted by write_tokens)."""
  if not like.quantized:
    return new
  values, scale = quantize(new.c_kv, "int4" if like.c_kv.dtype == jnp.uint8 else "int8")
  return LatentCache(c_kv=values, k_rope=store_float(new.k_rope, like.k_rope.dtype),
                     c_kv_scale=scale)


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


# A LatentCache ([B,T,...] new entries or [B,S,...] cache arrays) or a KVCache ([B,G,T,...] or
# [B,G,S,...]): each says where its token axis is (seq_axis).
Entries = TypeVar("Entries")


def write_cache(new: Entries, cache: Entries, lengths: jax.Array) -> Entries:
  """The cache with this step's entries (the cache's layout, T tokens on its seq_axis) written
  at slots lengths[b] .. (in place when the cache buffer is donated)."""
  return jax.tree_util.tree_map(lambda buf, x: write_tokens(buf, x, lengths, cache.seq_axis),
                                cache, new)


def slot_mask(lengths: jax.Array, max_len: int) -> jax.Array:
  """[B,S] True where a slot holds one of the sequence's first `lengths[b]` tokens."""
  return jnp.arange(max_len)[None, :] < lengths[:, None]


def latent_operand(cache: LatentCache) -> tuple[Any, Optional[Callable[[Any], jax.Array]]]:
  """The latent as flash-decoding walks it: (operand, block decoder).

  For a float cache the operand is c_kv itself [B,S,C] and the decoder None (flash_decode
  widens a block with load_float). For a quantized one the operand is {"values": c_kv,
  "scale": c_kv_scale} ([B,S,C or C/2] and [B,S,1], sliced into blocks together) and the
  decoder dequantizes one such block to float32 [B,blk,C]: the cache is never dequantized whole.
  """
  if not cache.quantized:
    return cache.c_kv, None
  return {"values": cache.c_kv, "scale": cache.c_kv_scale}, dequantize_block


def dequantize_block(block: dict) -> jax.Array:
  """latent_operand's block decoder: {"values" [B,blk,C or C/2], "scale" [B,blk,1]} -> float32
  [B,blk,C]."""
  return dequantize(block["values"], block["scale"])


def value_view(stored: jax.Array) -> jax.Array:
  """A float cache array as its values without conversion: uint16 bfloat16 bits -> bfloat16
  (a bitcast, which accelerators' compilers make free), float32 as it is. For a kernel that
  reads the cache itself; flash_decode widens blocks with load_float instead."""
  if stored.dtype == BF16_BITS:
    return jax.lax.bitcast_convert_type(stored, jnp.bfloat16)
  return stored


def latent_values(cache: LatentCache) -> LatentCache:
  """The whole cache as float32 values (dequantized / widened): for the reference paths only,
  since it is a full-size copy."""
  c_kv = (dequantize(cache.c_kv, cache.c_kv_scale) if cache.quantized
          else load_float(cache.c_kv))
  return LatentCache(c_kv=c_kv, k_rope=load_float(cache.k_rope))
