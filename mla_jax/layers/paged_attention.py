"""Flash-decoding over a paged cache: the same online softmax, walking a sequence's pages.

A block is `pages_per_block` consecutive entries of each sequence's page table: block i covers
the sequence's positions i*blk .. (i+1)*blk - 1 with blk = pages_per_block * page_size, so when
page_size divides the contiguous loop's block size and pages_per_block = block_size / page_size,
both loops reduce over the same blocks in the same order. Each block's pages are gathered into
a [B,blk,...] (latent) or [B,G,blk,...] (K/V) block, read once for scores and weighted sum; slots
at or past a sequence's length are zeroed (NaN-safe) and masked, and the loop stops after the
longest sequence's last block (layers/flash_decode.py has the math).

The interface, for a Pallas kernel to implement later (as vLLM's and FlashMLA's paged decode
kernels take it): queries, the page pool, the page table [B,M] and the lengths [B].
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from mla_jax.layers.flash_decode import (Partials, grouped_partials, mla_partials,
                                         online_softmax_loop, zero_empty_slots)
from mla_jax.paged_cache import gather_pages


def pages_per_block(block_size: int, page_size: int) -> int:
  """Pages per flash-decoding block: the contiguous loop's block_size slots, in whole pages
  (at least one)."""
  return max(1, block_size // page_size)


def paged_online_softmax(scores_fn, values_fn, pool: Any, *, page_table: jax.Array,
                         kv_lengths: jax.Array, query_positions: jax.Array, acc_shape,
                         pages_per_block: int, seq_axis: int = 1) -> Partials:
  """blocked_online_softmax over pages: pool is a pytree of [P,page,...] arrays (seq_axis 1:
  the latent) or [P,G,page,...] (seq_axis 2: head-major K/V); page_table [B,M] int32; the
  rest as in blocked_online_softmax. Blocks are [B,blk,...] / [B,G,blk,...]."""
  page_size = jax.tree_util.tree_leaves(pool)[0].shape[seq_axis]
  n = pages_per_block
  blk = n * page_size
  width = page_table.shape[1]

  def read_block(i: jax.Array):
    entries = jnp.minimum(i * n + jnp.arange(n), width - 1)  # [n] table columns of this block
    pages = jnp.take(page_table, entries, axis=1)  # [B,n]
    slot = i * blk + jnp.arange(blk)  # [blk] positions in the sequence
    holds = slot[None, :] < kv_lengths[:, None]  # [B,blk]
    block = jax.tree_util.tree_map(lambda x: gather_pages(x, pages, seq_axis), pool)
    return zero_empty_slots(block, holds, seq_axis), slot, holds

  num_blocks = (jnp.max(kv_lengths) + blk - 1) // blk  # traced: the early stop
  return online_softmax_loop(scores_fn, values_fn, read_block, num_blocks, query_positions,
                             acc_shape=acc_shape)


def paged_mla_decode_partials(q_lat: jax.Array, q_rope: jax.Array, c_kv: Any, k_rope: jax.Array,
                              page_table: jax.Array, kv_lengths: jax.Array, positions: jax.Array,
                              *, scale: float, pages_per_block: int,
                              dequantize: Optional[Callable[[Any], jax.Array]] = None
                              ) -> Partials:
  """mla_decode_partials over pages: (m, l [B,T,H], acc [B,T,H,C]) float32.

  q_lat [B,T,H,C]; q_rope [B,T,H,R]; c_kv the latent pool [P,page,C] (or, with `dequantize`, a
  pytree of [P,page,...] arrays that dequantize(block) turns into [B,blk,C]); k_rope
  [P,page,R]; page_table [B,M] int32; kv_lengths [B]: tokens per sequence; positions [B,T]:
  each query's position (it sees positions <= its own). normalize(l, acc) is out_lat.
  """
  walk = functools.partial(paged_online_softmax, page_table=page_table, kv_lengths=kv_lengths,
                           pages_per_block=pages_per_block)
  return mla_partials(q_lat, q_rope, {"c_kv": c_kv, "k_rope": k_rope}, positions, walk,
                      scale=scale, dequantize=dequantize)


def paged_grouped_decode_partials(q: jax.Array, k: jax.Array, v: jax.Array,
                                  page_table: jax.Array, kv_lengths: jax.Array,
                                  positions: jax.Array, *, scale: float,
                                  pages_per_block: int) -> Partials:
  """grouped_decode_partials over pages: q [B,T,G,J,K]; k [P,G,page,K]; v [P,G,page,V] (each
  page head-major, as the contiguous KVCache); page_table [B,M]; returns (m, l [B,T,G,J],
  acc [B,T,G,J,V])."""
  walk = functools.partial(paged_online_softmax, page_table=page_table, kv_lengths=kv_lengths,
                           pages_per_block=pages_per_block, seq_axis=2)
  return grouped_partials(q, {"k": k, "v": v}, positions, walk, scale=scale)
