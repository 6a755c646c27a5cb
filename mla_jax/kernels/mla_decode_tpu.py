"""The MLA decode kernel for TPU (Pallas, Mosaic): one program per (sequence, row block, KV
split).

Grid (B, row blocks, splits), all "parallel" (the two TensorCores of a megacore chip share
them). A program holds up to MAX_ROWS of its sequence's query rows (T*H, padded: all of them
for decoding, T = 1, even with DeepSeek-V2's 128 heads; a long prefill chunk takes several row
blocks, each reading the cache once) in VMEM, walks its share of the sequence's filled blocks
with a `fori_loop` whose trip count is read from the lengths (the early stop: a sequence costs
the blocks it holds, an empty one none), and writes its partials (m, l, acc).

The cache stays in HBM (memory_space ANY). Each block is copied into VMEM by DMA, double
buffered by hand: the copy of block j+1 is started before block j is waited on and computed, so
the next read overlaps this block's dots (the grid cannot pipeline a loop whose length is data).
One block is blk tokens of the latent [blk,Cs], its scales [blk,1] (int8/int4) and the RoPE key
[blk,R]: the RoPE key is kept apart, as the cache stores it. Packing it beside the latent as
512 + 128 lanes would add 64 padding lanes per token to every HBM read (11% at DeepSeek's
shapes); apart, HBM holds and moves no padding, and only the VMEM copy of the [blk,64] block is
lane-padded to 128 (a block is a full-width slice, which Mosaic's (8,128) tiling accepts).

Where the blocks come from:
  contiguous  latent [B,S,Cs]: block i is slots i*blk .. ; the last one is clamped to end at S
              (its slots before i*blk are masked: they were the previous block's), as in
              layers/flash_decode.py;
  paged       latent pool [P,page,Cs], page table (scalar prefetch, flattened [B*M]): block i
              is `pages_per_block` consecutive table entries, one DMA per page into the block
              buffer; pages wholly past the sequence's length are not copied.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mla_jax.kernels.mla_decode_block import (Queries, attend_block, partial_outputs,
                                             program_blocks, read_queries, row_spec,
                                             walk_blocks)

ROW_TILE = 16  # query rows are padded to a multiple of this (bfloat16's sublane tile)
MAX_ROWS = 512  # query rows per program: a 512 x 512 float32 accumulator is 1 MiB of VMEM


class Contiguous(NamedTuple):
  """Blocks of a contiguous cache [B,S,...] (static geometry)."""

  blk: int  # tokens per block, <= S
  seq: int  # S

  def bounds(self, i: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(start, first): block i reads slots start .. start+blk-1 and is responsible from first."""
    first = i * self.blk
    return jnp.minimum(first, self.seq - self.blk), first

  def copies(self, b, i, sources, buffers, sems, slot, prefetch):
    start, _ = self.bounds(i)
    return [(None, pltpu.make_async_copy(src.at[b, pl.ds(start, self.blk)], buf.at[slot],
                                         sems.at[k, slot]))
            for k, (src, buf) in enumerate(zip(sources, buffers))]


class Paged(NamedTuple):
  """Blocks of a paged cache [P,page,...] through a page table [B,M] (static geometry)."""

  pages_per_block: int
  page: int  # tokens per page
  width: int  # M: table entries per sequence
  num_pages: int  # P

  @property
  def blk(self) -> int:
    return self.pages_per_block * self.page

  def bounds(self, i: jax.Array) -> tuple[jax.Array, jax.Array]:
    return i * self.blk, i * self.blk

  def copies(self, b, i, sources, buffers, sems, slot, prefetch):
    lengths, table = prefetch
    out = []
    for j in range(self.pages_per_block):
      column = jnp.minimum(i * self.pages_per_block + j, self.width - 1)
      page = jnp.clip(table[b * self.width + column], 0, self.num_pages - 1)  # NO_PAGE: masked
      needed = i * self.blk + j * self.page < lengths[b]  # a page past the length is not read
      for k, (src, buf) in enumerate(zip(sources, buffers)):
        out.append((needed, pltpu.make_async_copy(
            src.at[page], buf.at[slot, pl.ds(j * self.page, self.page)], sems.at[k, slot])))
    return out


def _run(copies, action: str) -> None:
  for condition, copy in copies:
    if condition is None:
      getattr(copy, action)()
    else:
      pl.when(condition)(lambda copy=copy: getattr(copy, action)())


def _kernel(*refs, source, splits: int, planes: int, quantized: bool, compute, paged: bool):
  num_prefetch = 2 if paged else 1
  prefetch, refs = refs[:num_prefetch], refs[num_prefetch:]
  positions_ref, *refs = refs
  q_refs, (q_rope_ref,), refs = refs[:planes], refs[planes:planes + 1], refs[planes + 1:]
  n_cache = 3 if quantized else 2
  cache_refs, refs = refs[:n_cache], refs[n_cache:]
  m_ref, l_ref, acc_refs, refs = refs[0], refs[1], refs[2:2 + planes], refs[2 + planes:]
  buffers, sems = refs[:n_cache], refs[n_cache]

  b = pl.program_id(0)
  length = prefetch[0][b]
  first_block, count = program_blocks(length, source.blk, splits, pl.program_id(2))

  def copies(i, slot):
    return source.copies(b, i, cache_refs, buffers, sems, slot, prefetch)

  @pl.when(count > 0)
  def _():
    _run(copies(first_block, 0), "start")

  queries = read_queries(q_refs, q_rope_ref, positions_ref)

  def body(j, state):
    slot = j % 2

    @pl.when(j + 1 < count)
    def _():
      _run(copies(first_block + j + 1, 1 - slot), "start")

    _run(copies(first_block + j, slot), "wait")
    start, first = source.bounds(first_block + j)
    latent = buffers[0][slot]
    scale = buffers[1][slot] if quantized else None
    rope = buffers[-1][slot]
    return attend_block(state, queries, latent, scale, rope, start=start, first=first,
                        length=length, compute=compute)

  walk_blocks(count, body, queries, m_ref, l_ref, acc_refs)


def tpu_partials(queries: Queries, latent: jax.Array, scale: Optional[jax.Array],
                 rope: jax.Array, lengths: jax.Array, page_table: Optional[jax.Array], *,
                 source, splits: int, compute, interpret, block_q: int):
  """The kernel over B sequences: queries' arrays with a leading B ([B,rows,...], rows a
  multiple of block_q); latent, scale, rope the cache arrays ([B,S,...] for Contiguous, pools
  [P,page,...] for Paged with page_table [B,M]); lengths [B]. Returns (m, l [B,splits,rows,1],
  acc tuple of [B,splits,rows,C/planes]) float32, one partial per split. interpret: False, True
  (TPU interpret mode) or a pltpu.InterpretParams (e.g. with its race detector)."""
  b, rows = queries.positions.shape[:2]
  paged = page_table is not None
  quantized = scale is not None
  cache = (latent,) + ((scale,) if quantized else ()) + (rope,)
  in_specs = ([row_spec(x, block_q) for x in (queries.positions, *queries.lat, queries.rope)]
              + [pl.BlockSpec(memory_space=pl.ANY)] * len(cache))  # the cache stays in HBM
  out_specs, out_shape = partial_outputs(queries, splits, block_q)
  planes = len(queries.lat)
  scratch = ([pltpu.VMEM((2, source.blk) + x.shape[2:], x.dtype) for x in cache]
             + [pltpu.SemaphoreType.DMA((len(cache), 2))])
  prefetch = (lengths,) + ((page_table.reshape(-1),) if paged else ())
  kernel = functools.partial(_kernel, source=source, splits=splits, planes=planes,
                             quantized=quantized, compute=compute, paged=paged)
  m, l, *acc = pl.pallas_call(
      kernel, out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=len(prefetch),
                                             grid=(b, rows // block_q, splits),
                                             in_specs=in_specs, out_specs=out_specs,
                                             scratch_shapes=scratch),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3),
      interpret=pltpu.InterpretParams() if interpret is True else interpret,
      name="mla_decode_paged" if paged else "mla_decode",
  )(*prefetch, queries.positions, *queries.lat, queries.rope, *cache)
  return m, l, tuple(acc)
