"""Flash-decoding: attention over a cache read once, block by block, up to the longest sequence.

The cache is walked along S in blocks of `block_size` slots. Each block is read once and serves
both the scores and the weighted sum, through an online softmax (Milakov & Gimelshein 2018;
FlashAttention, Dao et al. 2022; flash-decoding, Dao et al. 2023): per query and head a running
max m, running sum l and running weighted value acc, all float32:

  m' = max(m, max_s score_s)        l' = l e^(m - m') + sum_s e^(score_s - m')
  acc' = acc e^(m - m') + sum_s e^(score_s - m') value_s          output = acc / l

The loop is a `lax.while_loop` whose trip count ceil(max_b kv_lengths[b] / block_size) is a
traced value, so a step costs what the batch's longest sequence holds, not the cache's max_len.
Blocks are views (`lax.dynamic_slice`): no copy, zeroed or widened, of the whole cache is ever
made. Slots at or past a sequence's length are zeroed inside the block (so a NaN there cannot
leak through 0 * NaN) and masked out of the softmax. A block size that does not divide S is
handled by clamping the last block's start and masking the slots the previous block already
covered.

Split over S (the cache's `sequence` mesh axis): each shard runs the same loop over its own slots
and returns its (m, l, acc); `combine_partials` merges them exactly.

`mla_decode_partials` is the function the MLA layer calls, so it is the signature a Pallas
kernel (FlashMLA-style, GPU/TPU) can implement later (`mla_decode_attention` is it normalised); `grouped_decode_partials` is the same loop for the MHA/GQA/MQA baselines' head-major
K/V cache [B,G,S,K] (walked along its axis 2).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mla_jax.cache import load_float
from mla_jax.config.model import ModelConfig
from mla_jax.layers.precision import einsum_f32

# model.decode_block_size's default, chosen by measurement (`mla-jax bench decode
# --block-sizes`, docs/decode.md): large enough that the loop's per-block overhead is
# amortised, small enough that a block stays in the core's caches.
DEFAULT_BLOCK_SIZE = ModelConfig.decode_block_size

Partials = tuple[jax.Array, jax.Array, jax.Array]  # (m [...], l [...], acc [..., V]) float32


def _check_block_size(block_size: int) -> None:
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
    raise ValueError(f"block_size={block_size!r} is invalid: must be a positive integer "
                     "(model.decode_block_size)")


def blocked_online_softmax(scores_fn: Callable[[Any], jax.Array],
                           values_fn: Callable[[jax.Array, Any], jax.Array], cache: Any,
                           kv_lengths: jax.Array, query_positions: jax.Array, *, block_size: int,
                           acc_shape: tuple[int, ...], seq_axis: int = 1) -> Partials:
  """The flash-decoding loop over a contiguous cache, generic over what a cache block holds.

  cache: a pytree of arrays with batch B first and the sequence S at `seq_axis` (any dtypes,
  e.g. a quantized latent [B,S,...] and its scales, or head-major keys [B,G,S,K] with
  seq_axis=2); blocks keep that layout ([B,blk,...] or [B,G,blk,K]).
  kv_lengths [B] int: slots 0 .. kv_lengths[b]-1 of row b hold tokens; no other slot is read
  into a result. query_positions: int, broadcastable to acc_shape[:-1]: each query sees the slots
  <= its position (causal). scores_fn(block) -> float32 scores acc_shape[:-1] + [blk], already
  scaled; values_fn(probs, block) -> float32 acc_shape, the probability-weighted sum of the
  block's values. acc_shape: [B, *queries, V]. Returns the partials (m, l [B,*queries],
  acc [B,*queries,V]); a query that saw no slot has m = -inf, l = 0, acc = 0.

  Callers flatten their query axes (time x heads) into as few as the dots need, and keep the
  cache's batch-like axes leading: on XLA:CPU a [B,T,H,C] x [B,blk,C] score dot, or one over a
  [B,blk,G,K] block with G as a batch dimension in the middle, is compiled with a transposed
  copy of every block, which cost more than the dot itself; [B,T*H,C] x [B,blk,C] and
  [B,G,Q,K] x [B,G,blk,K] read the block as it lies.
  """
  _check_block_size(block_size)
  s = jax.tree_util.tree_leaves(cache)[0].shape[seq_axis]
  blk = min(block_size, s)

  def read_block(i: jax.Array) -> tuple[Any, jax.Array, jax.Array]:
    first = i * blk  # the first slot this block is responsible for
    start = jnp.minimum(first, s - blk)  # the last block is clamped to end at S ...
    slot = start + jnp.arange(blk)  # [blk]
    holds = (slot[None, :] >= first) & (slot[None, :] < kv_lengths[:, None])  # ... [B,blk]
    block = jax.tree_util.tree_map(
        lambda x: jax.lax.dynamic_slice_in_dim(x, start, blk, axis=seq_axis), cache)
    return zero_empty_slots(block, holds, seq_axis), slot, holds

  num_blocks = (jnp.max(kv_lengths) + blk - 1) // blk  # traced: the early stop
  return online_softmax_loop(scores_fn, values_fn, read_block, num_blocks, query_positions,
                             acc_shape=acc_shape)


def zero_empty_slots(block: Any, holds: jax.Array, seq_axis: int) -> Any:
  """The block with every slot that holds no token zeroed (so a NaN left there cannot leak
  through 0 * NaN): holds [B,blk] broadcast over each leaf's axes around its seq_axis."""
  b, blk = holds.shape

  def zero(x: jax.Array) -> jax.Array:
    keep = holds.reshape((b,) + (1,) * (seq_axis - 1) + (blk,) + (1,) * (x.ndim - seq_axis - 1))
    return jnp.where(keep, x, jnp.zeros((), x.dtype))

  return jax.tree_util.tree_map(zero, block)


def online_softmax_loop(scores_fn: Callable[[Any], jax.Array],
                        values_fn: Callable[[jax.Array, Any], jax.Array],
                        read_block: Callable[[jax.Array], tuple[Any, jax.Array, jax.Array]],
                        num_blocks: "jax.Array | int", query_positions: jax.Array, *,
                        acc_shape: tuple[int, ...]) -> Partials:
  """The online softmax over blocks 0 .. num_blocks-1 (a traced count: the early stop, run as a
  while loop; or a Python int: unrolled, so XLA sees every block's operations at once), for
  any cache layout: read_block(i) -> (block, slot [blk] int: each block slot's absolute position
  in its sequence, holds [B,blk] bool: which slots hold a token this block is responsible for),
  with the empty slots already zeroed. scores_fn, values_fn, query_positions and acc_shape as in
  blocked_online_softmax, which is this loop over a contiguous cache (layers/paged_attention.py
  runs it over pages)."""
  b = acc_shape[0]
  m0 = jnp.full(acc_shape[:-1], -jnp.inf, jnp.float32)
  carry0 = (jnp.int32(0), m0, jnp.zeros(acc_shape[:-1], jnp.float32),
            jnp.zeros(acc_shape, jnp.float32))
  between = (1,) * (len(acc_shape) - 2)  # the query axes, for broadcasting a [B,blk] mask

  def body(carry):
    i, m, l, acc = carry
    block, slot, holds = read_block(i)
    scores = scores_fn(block)  # [B,*queries,blk] float32
    blk = slot.shape[-1]
    visible = holds.reshape((b,) + between + (blk,)) & (slot <= query_positions[..., None])
    scores = jnp.where(visible, scores, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # all masked so far: exp(-inf) = 0
    probs = jnp.exp(scores - m_safe[..., None])  # [B,*queries,blk]
    correction = jnp.exp(m - m_safe)
    l = l * correction + jnp.sum(probs, axis=-1)
    acc = acc * correction[..., None] + values_fn(probs, block)
    return i + 1, m_new, l, acc

  if isinstance(num_blocks, int):
    carry = carry0
    for _ in range(num_blocks):
      carry = body(carry)
    return carry[1:]
  _, m, l, acc = jax.lax.while_loop(lambda c: c[0] < num_blocks, body, carry0)
  return m, l, acc


def combine_partials(m: jax.Array, l: jax.Array, acc: jax.Array, axis_name: str) -> jax.Array:
  """Exact merge of per-shard partials over a mesh axis (inside shard_map): acc / l, float32."""
  _, l_all, acc_all = _merge(m, l, acc, lambda x: jax.lax.pmax(x, axis_name),
                             lambda x: jax.lax.psum(x, axis_name))
  return normalize(l_all, acc_all)


def merge_splits(m: jax.Array, l: jax.Array, acc: jax.Array, axis: int) -> Partials:
  """combine_partials over an array axis instead of a mesh axis, before the division: partials
  of disjoint parts of S stacked on `axis` of m, l [...] and acc [..., V] (e.g. a split-KV
  kernel's [B,splits,...]) -> the partials of their union, that axis gone."""
  m_all, l_all, acc_all = _merge(m, l, acc, lambda x: jnp.max(x, axis, keepdims=True),
                                 lambda x: jnp.sum(x, axis, keepdims=True))
  return m_all.squeeze(axis), l_all.squeeze(axis), acc_all.squeeze(axis)


def _merge(m, l, acc, reduce_max, reduce_sum) -> Partials:
  """The exact log-sum-exp merge of partials over whatever reduce_max / reduce_sum reduce (the
  results broadcast against m): m_all = max m, l_all = sum l e^(m - m_all), acc likewise."""
  m_all = reduce_max(m)
  m_safe = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
  weight = jnp.exp(m - m_safe)  # 0 for a part that saw nothing
  return m_all, reduce_sum(l * weight), reduce_sum(acc * weight[..., None])


def normalize(l: jax.Array, acc: jax.Array) -> jax.Array:
  """acc / l; 0 for a query that saw no slot (a padding row), never NaN."""
  return acc / jnp.where(l > 0, l, 1.0)[..., None]


def mla_decode_attention(q_lat: jax.Array, q_rope: jax.Array, c_kv: Any, k_rope: jax.Array,
                         kv_lengths: jax.Array, positions: jax.Array, *, scale: float,
                         block_size: int = DEFAULT_BLOCK_SIZE,
                         dequantize: Optional[Callable[[Any], jax.Array]] = None) -> jax.Array:
  """Absorbed MLA attention over the latent cache: out_lat [B,T,H,C] float32.

  q_lat [B,T,H,C] = q_nope W_UK^T; q_rope [B,T,H,R]; c_kv [B,S,C] (or, with `dequantize`, any
  pytree of [B,S,...] arrays that `dequantize(block)` turns into a float latent block [B,blk,C]);
  k_rope [B,S,R]; kv_lengths [B]; positions [B,T] (see blocked_online_softmax); scale: the
  softmax scale (config.softmax_scale). out_lat is softmax(q_lat c^T + q_rope k_rope^T) c, to be
  multiplied by W_UV. Raises ValueError for a block_size that is not a positive integer.
  """
  return normalize(*mla_decode_partials(q_lat, q_rope, c_kv, k_rope, kv_lengths, positions,
                                        scale=scale, block_size=block_size,
                                        dequantize=dequantize)[1:])


def mla_decode_partials(q_lat: jax.Array, q_rope: jax.Array, c_kv: Any, k_rope: jax.Array,
                        kv_lengths: jax.Array, positions: jax.Array, *, scale: float,
                        block_size: int = DEFAULT_BLOCK_SIZE,
                        dequantize: Optional[Callable[[Any], jax.Array]] = None) -> Partials:
  """mla_decode_attention before its final division: (m, l [B,T,H], acc [B,T,H,C]), for
  merging shards of S with combine_partials."""
  walk = functools.partial(blocked_online_softmax, kv_lengths=kv_lengths, block_size=block_size)
  return mla_partials(q_lat, q_rope, {"c_kv": c_kv, "k_rope": k_rope}, positions, walk,
                      scale=scale, dequantize=dequantize)


# How a cache is walked: walk(scores_fn, values_fn, cache, query_positions=, acc_shape=) ->
# partials; blocked_online_softmax over a contiguous cache, or over pages (paged_attention.py).
Walk = Callable[..., Partials]


def mla_partials(q_lat: jax.Array, q_rope: jax.Array, cache: dict, positions: jax.Array,
                 walk: Walk, *, scale: float,
                 dequantize: Optional[Callable[[Any], jax.Array]] = None) -> Partials:
  """The absorbed MLA scores and weighted sum over the blocks `walk` reads from cache
  {"c_kv", "k_rope"}: partials (m, l [B,T,H], acc [B,T,H,C]) for any cache layout."""
  b, t, h, c = q_lat.shape
  # Queries flattened to Q = T*H (see blocked_online_softmax); scaled once, not per block.
  q_lat = (q_lat.astype(jnp.float32) * scale).reshape(b, t * h, c)  # [B,Q,C]
  q_rope = (q_rope.astype(jnp.float32) * scale).reshape(b, t * h, -1)  # [B,Q,R]
  query_positions = jnp.repeat(positions, h, axis=1)  # [B,Q]: query t*H + h is at positions[b,t]
  latent = (lambda block: load_float(block["c_kv"])) if dequantize is None else (
      lambda block: dequantize(block["c_kv"]))

  def scores(block):  # one read of the block serves both terms
    return (einsum_f32("BQC,BSC->BQS", q_lat, latent(block))
            + einsum_f32("BQR,BSR->BQS", q_rope, load_float(block["k_rope"])))

  def values(probs, block):
    return einsum_f32("BQS,BSC->BQC", probs, latent(block))

  m, l, acc = walk(scores, values, cache, query_positions=query_positions,
                   acc_shape=(b, t * h, c))
  return m.reshape(b, t, h), l.reshape(b, t, h), acc.reshape(b, t, h, c)


def grouped_decode_partials(q: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array,
                            positions: jax.Array, *, scale: float,
                            block_size: int = DEFAULT_BLOCK_SIZE) -> Partials:
  """MHA/GQA/MQA attention over a K/V cache, same loop: partials (m, l [B,T,G,J], acc
  [B,T,G,J,V]); normalize(l, acc) is the output.

  q [B,T,G,J,K] (J = H/G query heads per key/value head); k [B,G,S,K]; v [B,G,S,V] (the
  head-major KVCache layout: the block dots have B,G as leading batch dims and read each
  [blk,K] / [blk,V] block as it lies).
  """
  walk = functools.partial(blocked_online_softmax, kv_lengths=kv_lengths, block_size=block_size,
                           seq_axis=2)
  return grouped_partials(q, {"k": k, "v": v}, positions, walk, scale=scale)


def grouped_partials(q: jax.Array, cache: dict, positions: jax.Array, walk: Walk, *,
                     scale: float) -> Partials:
  """The grouped-query scores and weighted sum over the blocks `walk` reads from cache
  {"k", "v"} (blocks [B,G,blk,K] / [B,G,blk,V]): partials (m, l [B,T,G,J], acc [B,T,G,J,V])."""
  b, t, g, j, _ = q.shape
  # Queries flattened to [B,G,Q=T*J,K] (see blocked_online_softmax).
  q = (q.astype(jnp.float32) * scale).transpose(0, 2, 1, 3, 4).reshape(b, g, t * j, -1)
  query_positions = jnp.repeat(positions, j, axis=1)[:, None, :]  # [B,1,Q]

  def scores(block):
    return einsum_f32("BGQK,BGSK->BGQS", q, load_float(block["k"]))

  def values(probs, block):
    return einsum_f32("BGQS,BGSV->BGQV", probs, load_float(block["v"]))

  v_dim = jax.tree_util.tree_leaves(cache["v"])[0].shape[-1]
  m, l, acc = walk(scores, values, cache, query_positions=query_positions,
                   acc_shape=(b, g, t * j, v_dim))

  def unflatten(x: jax.Array) -> jax.Array:  # [B,G,T*J,...] -> [B,T,G,J,...]
    x = x.reshape((b, g, t, j) + x.shape[3:])
    return jnp.moveaxis(x, 2, 1)

  return unflatten(m), unflatten(l), unflatten(acc)


def split_over_sequence(partials_fn: Callable[..., Partials], queries: tuple, cache: tuple,
                        kv_lengths: jax.Array, positions: jax.Array, *, batch_axes, seq_axes,
                        seq_axis: int = 1) -> jax.Array:
  """Runs `partials_fn(*queries, *cache, kv_lengths, positions)` on each shard of S and merges.

  For a cache whose S is split over mesh axes `seq_axes` (and B over `batch_axes`) under the
  current mesh: each device walks only its own slots (its kv_lengths and positions shifted by its
  shard's first slot) and the (m, l, acc) triples are combined exactly. queries: [B,T,...] arrays;
  cache: arrays with B first and S at `seq_axis` ([B,S,...] latent, [B,G,S,...] K/V). Returns
  normalize(...) of the whole: [B,T,...,V] float32.
  """
  seq_axes = tuple(seq_axes)
  q_spec = lambda x: P(batch_axes, *([None] * (x.ndim - 1)))
  c_spec = lambda x: P(batch_axes, *([None] * (seq_axis - 1)), seq_axes,
                       *([None] * (x.ndim - seq_axis - 1)))

  def local(queries, cache, kv_lengths, positions):
    s_local = jax.tree_util.tree_leaves(cache)[0].shape[seq_axis]
    first = jax.lax.axis_index(seq_axes) * s_local  # this shard's first slot
    own = jnp.clip(kv_lengths - first, 0, s_local)
    m, l, acc = partials_fn(*queries, *cache, own, positions - first)
    return combine_partials(m, l, acc, seq_axes)

  out_spec = P(batch_axes, *([None] * (queries[0].ndim - 1)))
  return jax.shard_map(
      local, in_specs=(jax.tree_util.tree_map(q_spec, queries),
                       jax.tree_util.tree_map(c_spec, cache), P(batch_axes), P(batch_axes, None)),
      out_specs=out_spec, check_vma=False)(queries, cache, kv_lengths, positions)
