"""The MLA decode kernel for GPU (Pallas, Triton lowering): one program per (sequence, row
block, KV split).

Grid (B, row blocks, splits). A program holds `block_q` query rows (of the T*H, padded) and walks
its share of the sequence's filled blocks with a `fori_loop` whose trip count comes from the
sequence's length (the early stop), loading each block of blk tokens from global memory with
masked loads: slots at or past the length are neither read nor trusted (they load as zeros).
Triton software-pipelines the loop's loads (`num_stages`), so the next block's load overlaps
this block's dots. With T*H <= block_q (DeepSeek-V2-Lite's 16 heads at T = 1) every block is read
once for all heads; with more rows each row block reads it once (the row blocks of a sequence
run side by side and share it through L2), because one program's float32 accumulator of
block_q x C must fit its registers.

Where the blocks come from:
  contiguous  latent [B,S,Cs]: block i is slots i*blk .. i*blk+blk-1 (a masked load: no clamp);
  paged       latent pool [P,page,Cs] and page table [B,M]: block i gathers `pages_per_block`
              consecutive table entries' pages (one vectorised load), masked past the length.

Triton needs every loaded shape to be a power of 2 and every dot at least 16 x 16 x 16, so
block_q, blk, the latent's (per plane) width and the RoPE width must be powers of 2 >= 16
(DeepSeek's 512 + 64 are); mla_decode.py checks it before tracing.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mla_jax.kernels.mla_decode_block import (Queries, attend_block, partial_outputs,
                                             program_blocks, read_queries, row_spec,
                                             walk_blocks)

MIN_DOT = 16  # Triton's smallest dot tile along each dimension


class Contiguous(NamedTuple):
  """Blocks of a contiguous cache [B,S,...]."""

  blk: int

  def load(self, refs, b, i, length):
    """(start, [latent, scale or None, rope]) of block i of sequence b."""
    start = i * self.blk
    holds = start + jnp.arange(self.blk) < length  # [blk]
    out = [plgpu.load(ref.at[b, pl.ds(start, self.blk)], mask=holds[:, None], other=0)
           if ref is not None else None for ref in refs]
    return start, out


class Paged(NamedTuple):
  """Blocks of a paged cache [P,page,...] through the page table [B,M]."""

  pages_per_block: int
  page: int
  width: int  # M
  num_pages: int  # P

  @property
  def blk(self) -> int:
    return self.pages_per_block * self.page

  def load(self, refs, b, i, length, table_ref):
    n = self.pages_per_block
    start = i * self.blk
    columns = i * n + jnp.arange(n)  # [n]
    pages = plgpu.load(table_ref.at[b, pl.ds(i * n, n)], mask=columns < self.width, other=0)
    pages = jnp.clip(pages, 0, self.num_pages - 1)  # NO_PAGE entries lie past the length
    slot = start + jnp.arange(n)[:, None] * self.page + jnp.arange(self.page)[None, :]  # [n,page]
    holds = (slot < length)[:, :, None]  # [n,page,1]

    def gather(ref):  # [n,page,W] by one index array per axis, masked past the length
      width = ref.shape[2]
      index = (pages[:, None, None], jnp.arange(self.page)[None, :, None],
               jnp.arange(width)[None, None, :])
      block = plgpu.load(ref.at[index], mask=jnp.broadcast_to(holds, (n, self.page, width)),
                         other=0)
      return block.reshape(self.blk, width)

    return start, [gather(ref) if ref is not None else None for ref in refs]


def _kernel(*refs, source, splits: int, planes: int, quantized: bool, compute, paged: bool):
  lengths_ref, *refs = refs
  table_ref = None
  if paged:
    table_ref, *refs = refs
  positions_ref, *refs = refs
  q_refs, q_rope_ref, refs = refs[:planes], refs[planes], refs[planes + 1:]
  latent_ref, refs = refs[0], refs[1:]
  scale_ref = None
  if quantized:
    scale_ref, refs = refs[0], refs[1:]
  rope_ref, m_ref, l_ref, acc_refs = refs[0], refs[1], refs[2], refs[3:]

  b = pl.program_id(0)
  length = lengths_ref[b]
  first_block, count = program_blocks(length, source.blk, splits, pl.program_id(2))
  queries = read_queries(q_refs, q_rope_ref, positions_ref)

  def body(j, state):
    i = first_block + j
    extra = (table_ref,) if paged else ()
    start, (latent, scale, rope) = source.load((latent_ref, scale_ref, rope_ref), b, i, length,
                                               *extra)
    return attend_block(state, queries, latent, scale, rope, start=start, first=start,
                        length=length, compute=compute)

  walk_blocks(count, body, queries, m_ref, l_ref, acc_refs)


def gpu_partials(queries: Queries, latent: jax.Array, scale: Optional[jax.Array],
                 rope: jax.Array, lengths: jax.Array, page_table: Optional[jax.Array], *,
                 source, splits: int, compute, interpret: bool, block_q: int,
                 num_warps: int = 4, num_stages: int = 2):
  """The kernel over B sequences, as mla_decode_tpu.tpu_partials (rows a multiple of
  block_q): (m, l [B,splits,rows,1], acc tuple of [B,splits,rows,C/planes]) float32."""
  b, rows = queries.positions.shape[:2]
  paged = page_table is not None
  quantized = scale is not None
  cache = (latent,) + ((scale,) if quantized else ()) + (rope,)

  def whole(x):
    return pl.BlockSpec(x.shape, lambda i, r, s: (0,) * x.ndim)

  table = (page_table,) if paged else ()
  in_specs = ([whole(lengths)] + [whole(t) for t in table]
              + [row_spec(x, block_q) for x in (queries.positions, *queries.lat, queries.rope)]
              + [whole(x) for x in cache])
  out_specs, out_shape = partial_outputs(queries, splits, block_q)
  planes = len(queries.lat)
  kernel = functools.partial(_kernel, source=source, splits=splits, planes=planes,
                             quantized=quantized, compute=compute, paged=paged)
  m, l, *acc = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(b, rows // block_q, splits), in_specs=in_specs,
      out_specs=out_specs,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="mla_decode_paged" if paged else "mla_decode",
  )(lengths, *table, queries.positions, *queries.lat, queries.rope, *cache)
  return m, l, tuple(acc)
