"""The paged decode cache: per layer a pool of fixed-size pages, per sequence a page table.

A contiguous cache gives every sequence max_len slots up front. A paged one (vLLM's
PagedAttention, Kwon et al. 2023) keeps, per layer, one pool of `num_pages` pages of
`page_size` token slots, in the same storage as the contiguous cache (mla_jax/cache.py) with the
pages where the batch was: MLA's pool is c_kv [P,page,C] and k_rope [P,page,R] (int8/int4: the
encoded latent and its per-token scales [P,page,1]); a baseline's is head-major k [P,G,page,K]
and v [P,G,page,V]. Sequence b's token at position p lives in slot p % page_size of page
page_table[b, p // page_size]; a sequence holds ceil(tokens / page_size) pages, allocated as
it grows (host-side bookkeeping: mla_jax/serving/pages.py). Empty pools are made by
mla_jax.kinds.init_paged_cache, beside init_cache.

Table entries past a sequence's pages are `NO_PAGE` (= num_pages, outside the pool): a write
there is dropped, and reads never reach a slot at or past the sequence's length. Attention walks
a sequence's pages through its table (mla_jax/layers/paged_attention.py).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from mla_jax.cache import LatentCache, LayerCache, store_float


@struct.dataclass
class PagedLayerCache:
  """One layer's page pool (a LatentCache or KVCache whose batch axis holds pages and whose
  sequence axis holds a page's slots) and, while the model runs, the batch's page table."""

  pool: LayerCache  # [P,page,...] latent, or [P,G,page,...] K/V
  page_table: Optional[jax.Array] = None  # [B,M] int32 page ids; attached by the forward pass

  @property
  def page_size(self) -> int:
    return jax.tree_util.tree_leaves(self.pool)[0].shape[self.pool.seq_axis]

  @property
  def num_pages(self) -> int:
    return jax.tree_util.tree_leaves(self.pool)[0].shape[0]


@struct.dataclass
class PagedCache:
  """All layers' page pools, the page table [B,M] and each sequence's length [B]."""

  layers: tuple[PagedLayerCache, ...]
  lengths: jax.Array  # [B] int32 tokens held per sequence
  page_table: jax.Array  # [B,M] int32: M pages per sequence at most, NO_PAGE where unused

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]

  @property
  def max_len(self) -> int:
    """Tokens one sequence can hold: M pages of page_size slots."""
    return self.page_table.shape[1] * self.layers[0].page_size

  def with_tables(self) -> tuple[PagedLayerCache, ...]:
    """The layers with the page table attached, as the attention layers take them."""
    return tuple(layer.replace(page_table=self.page_table) for layer in self.layers)

  def updated(self, layers, num_tokens: jax.Array) -> "PagedCache":
    """This cache after a forward pass wrote num_tokens [B] more tokens into `layers`."""
    return PagedCache(layers=tuple(layer.replace(page_table=None) for layer in layers),
                      lengths=self.lengths + num_tokens, page_table=self.page_table)


def no_page(num_pages: int) -> int:
  """The page-table entry of an unused slot in a pool of num_pages pages (out of range)."""
  return num_pages


def page_bytes(cache: PagedCache) -> int:
  """Bytes of one page in all layers' pools (what a sequence pays per page_size tokens); the
  cache may be arrays or jax.eval_shape's ShapeDtypeStructs."""
  return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize // layer.num_pages
             for layer in cache.layers for leaf in jax.tree_util.tree_leaves(layer.pool))


def token_slots(page_table: jax.Array, lengths: jax.Array, num_new: int, num_tokens: jax.Array,
                page_size: int, num_pages: int) -> tuple[jax.Array, jax.Array]:
  """Where the new tokens go: (page [B,T], slot [B,T]) of token t of row b, at position
  lengths[b] + t; tokens past num_tokens[b] (padding) get page NO_PAGE, so their write drops."""
  positions = lengths[:, None] + jnp.arange(num_new, dtype=jnp.int32)[None, :]  # [B,T]
  index = jnp.minimum(positions // page_size, page_table.shape[1] - 1)
  pages = jnp.take_along_axis(page_table, index, axis=1)  # [B,T]
  real = jnp.arange(num_new)[None, :] < num_tokens[:, None]
  return jnp.where(real, pages, no_page(num_pages)), positions % page_size


def write_paged(new: LayerCache, cache: PagedLayerCache, lengths: jax.Array,
                num_tokens: jax.Array) -> PagedLayerCache:
  """The layer's pool with this step's entries written through the page table: new is in the
  contiguous layout with T tokens on its seq_axis ([B,T,...] latent, [B,G,T,...] K/V, already
  encoded for a quantized pool); the first num_tokens[b] of row b go to positions lengths[b] ..
  A scatter into the donated pool, in place; entries aimed at NO_PAGE are dropped."""
  pool, axis = cache.pool, cache.pool.seq_axis
  leaf = jax.tree_util.tree_leaves(new)[0]
  b, t = leaf.shape[0], leaf.shape[axis]
  pages, slots = token_slots(cache.page_table, lengths, t, num_tokens, cache.page_size,
                             cache.num_pages)  # [B,T] each

  def write(buffer: jax.Array, values: jax.Array) -> jax.Array:
    between = values.shape[1:axis]  # e.g. (G,): written whole
    shape = (b,) + (1,) * len(between) + (t,)
    middle = [jnp.arange(n).reshape((1,) * (i + 1) + (n,) + (1,) * (len(between) - i))
              for i, n in enumerate(between)]
    return buffer.at[(pages.reshape(shape), *middle, slots.reshape(shape))].set(
        store_float(values, buffer.dtype), mode="drop")

  return cache.replace(pool=jax.tree_util.tree_map(write, pool, new))


def gather_pages(pool_leaf: jax.Array, pages: jax.Array, seq_axis: int) -> jax.Array:
  """The pages [B,n] of one pool array laid out as a contiguous cache block: [P,page,...] ->
  [B,n*page,...] (seq_axis 1), [P,G,page,...] -> [B,G,n*page,...] (seq_axis 2). Out-of-range
  ids (NO_PAGE) read the last page; callers mask those slots."""
  block = jnp.take(pool_leaf, pages, axis=0, mode="clip")  # [B,n,(G,)page,...]
  block = jnp.moveaxis(block, 1, seq_axis)  # [B,(G,)n,page,...]
  shape = block.shape
  return block.reshape(shape[:seq_axis] + (shape[seq_axis] * shape[seq_axis + 1],)
                       + shape[seq_axis + 2:])


def as_contiguous(cache: PagedLayerCache) -> LayerCache:
  """The layer as a contiguous cache [B, M*page, ...] (every page of every table gathered): for
  the reference attention paths only, since it is a full-size copy."""
  pool = cache.pool
  return jax.tree_util.tree_map(lambda x: gather_pages(x, cache.page_table, pool.seq_axis), pool)


def copy_pages(cache: PagedCache, sources: jax.Array, targets: jax.Array) -> PagedCache:
  """The cache with page sources[i] copied to page targets[i] in every layer's pool (a
  copy-on-write of a shared page); pairs with target NO_PAGE are skipped."""

  def copy(pool_leaf: jax.Array) -> jax.Array:
    return pool_leaf.at[targets].set(jnp.take(pool_leaf, sources, axis=0, mode="clip"),
                                     mode="drop")

  return cache.replace(layers=tuple(
      layer.replace(pool=jax.tree_util.tree_map(copy, layer.pool)) for layer in cache.layers))
