"""One latent block inside an MLA decode kernel: the scores and the weighted sum from one read;
and what both kernels' programs share (their queries, blocks, loop and outputs).

Both kernels (mla_decode_tpu.py, Mosaic; mla_decode_gpu.py, Triton) load a block of `blk`
cached tokens, the stored latent [blk,Cs] (Cs = C, or C/2 for packed int4), its per-token scale
[blk,1] (int8/int4) and the RoPE key [blk,R], and hand it here with the running state. All
heads' (and all T new tokens') queries are the rows of one matrix, Q = T*H rows, padded to the
kernel's row tile:

  s    = (q_lat . c) + (q_rope . k_rope)               [Q,blk]   (scale already in the queries)
  m'   = max(m, max_s s)     l' = l e^(m - m') + sum_s e^(s - m')
  acc' = acc e^(m - m') + e^(s - m') . c                [Q,C]

the online softmax of layers/flash_decode.py, in float32, with the block read once for both
dots. The latent is decoded in the kernel by the cache codec itself (cache.dequantize_planes:
an int8 block is values * scale; a packed int4 one gives two planes, the even and the odd latent
elements, so no lane interleave is needed in the kernel: the queries come split the same way,
q_lat . c = sum over planes, and the weighted sum is kept per plane, interleaved after the
kernel by cache.interleave).

Masks: a slot holds a token of this block when first <= slot < length (slot: its position in
the sequence; `first` > start only for a contiguous cache's last block, clamped to end at S);
a query row sees the slots that hold one at positions <= its own. Latent rows that hold no token
are zeroed before the weighted sum (0 * NaN would leak a NaN left in an empty slot); scores of
masked slots are replaced, not multiplied, so a NaN there never reaches a result.

Dots take `compute` operands (float32 with HIGHEST precision, so TPU and GPU do not round them
to bfloat16 or TF32; or bfloat16, the MXU's and tensor cores' input, when the cache or the
queries are bfloat16 or the latent is quantized into a bfloat16 model) and accumulate in
float32.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mla_jax.cache import dequantize_planes


class Queries(NamedTuple):
  """One row block of queries as a kernel holds them (R rows: padded T*H)."""

  lat: tuple[jax.Array, ...]  # latent planes, each [R, C/planes] (compute dtype, scaled)
  rope: jax.Array  # [R, Rd] (compute dtype, scaled)
  positions: jax.Array  # [R,1] int32: the position each row sees up to (-1: padding, sees none)


class State(NamedTuple):
  """The online softmax's running values for R query rows, float32."""

  m: jax.Array  # [R,1] running max (-inf before any visible slot)
  l: jax.Array  # [R,1] running sum of e^(s - m)
  acc: tuple[jax.Array, ...]  # per latent plane [R, C/planes], running weighted latent


def initial_state(rows: int, plane_widths: tuple[int, ...]) -> State:
  """The state before any block: m = -inf, l = 0, acc = 0."""
  return State(m=jnp.full((rows, 1), -jnp.inf, jnp.float32),
               l=jnp.zeros((rows, 1), jnp.float32),
               acc=tuple(jnp.zeros((rows, w), jnp.float32) for w in plane_widths))


def program_blocks(length: jax.Array, blk: int, splits: int, split: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """(first block, block count) of KV split `split` of a sequence holding `length` tokens in
  blocks of blk: the blocks that hold tokens, shared evenly among the splits (a split past them
  gets none). The count is the loop's trip count: the early stop."""
  held = pl.cdiv(length, blk)  # lax.div: no sign test (its Mosaic lowering wants a TPU)
  per_split = pl.cdiv(held, splits)
  first = split * per_split
  return first, jnp.clip(held - first, 0, per_split)


def read_queries(q_refs, q_rope_ref, positions_ref) -> Queries:
  """A program's query rows, loaded from its blocks of the kernel's inputs."""
  return Queries(lat=tuple(r[...] for r in q_refs), rope=q_rope_ref[...],
                 positions=positions_ref[...])


def walk_blocks(count: jax.Array, body, queries: Queries, m_ref, l_ref, acc_refs) -> None:
  """Runs body(j, state) -> state for j < count from the initial state and writes the final
  state to the program's output blocks (m, l [R,1], acc per plane [R,C/planes])."""
  widths = tuple(q.shape[-1] for q in queries.lat)
  state = jax.lax.fori_loop(0, count, body, initial_state(queries.positions.shape[0], widths))
  m_ref[...] = state.m
  l_ref[...] = state.l
  for ref, acc in zip(acc_refs, state.acc):
    ref[...] = acc


def row_spec(x: jax.Array, block_q: int) -> pl.BlockSpec:
  """A query array [B,rows,W]: a program's block_q rows of its sequence (grid (b, r, s), plus
  the TPU kernel's prefetched arrays)."""
  return pl.BlockSpec((None, block_q, x.shape[-1]), lambda i, r, s, *_: (i, r, 0))


def partial_outputs(queries: Queries, splits: int, block_q: int) -> tuple[list, list]:
  """(out_specs, out_shape) of the partials: m, l [B,splits,rows,1] and acc per plane
  [B,splits,rows,C/planes], float32; a program writes its rows of its split."""
  b, rows = queries.positions.shape[:2]
  widths = (1, 1) + tuple(q.shape[-1] for q in queries.lat)
  specs = [pl.BlockSpec((None, None, block_q, w), lambda i, r, s, *_: (i, s, r, 0))
           for w in widths]
  return specs, [jax.ShapeDtypeStruct((b, splits, rows, w), jnp.float32) for w in widths]


def compute_dtype(latent_value_dtype, query_dtype) -> jnp.dtype:
  """The dots' operand dtype: bfloat16 when the cached values or the queries are bfloat16, or the
  latent is quantized (int8/int4 values are exact in bfloat16) in a model that is not float32;
  float32 otherwise (a float32 model over an int8 cache keeps float32 dots)."""
  if jnp.dtype(latent_value_dtype) == jnp.bfloat16 or jnp.dtype(query_dtype) == jnp.bfloat16:
    return jnp.dtype(jnp.bfloat16)
  return jnp.dtype(jnp.float32)


def _dot(a: jax.Array, b: jax.Array, contract_b: int) -> jax.Array:
  """a [M,K] times b ([N,K] for contract_b=1, [K,N] for 0) -> [M,N] float32."""
  precision = (jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None)
  return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


def attend_block(state: State, queries: Queries, stored: jax.Array, scale: Optional[jax.Array],
                 rope: jax.Array, *, start: jax.Array, first: jax.Array, length: jax.Array,
                 compute: jnp.dtype) -> State:
  """The state after one block: stored [blk,Cs] (float values, or int8 / packed-int4 uint8 with
  scale [blk,1] float32), rope [blk,Rd]; slot j of the block is position start + j; it holds a
  token when first <= start + j < length (int32 scalars)."""
  blk = rope.shape[0]
  column = start + jax.lax.broadcasted_iota(jnp.int32, (blk, 1), 0)  # [blk,1] positions
  row = start + jax.lax.broadcasted_iota(jnp.int32, (1, blk), 1)  # [1,blk] the same, as a row
  holds_column = (column >= first) & (column < length)
  holds_row = (row >= first) & (row < length)

  planes = (stored,) if scale is None else dequantize_planes(stored, scale)  # the codec's decode
  planes = tuple(jnp.where(holds_column, p, jnp.zeros((), p.dtype)).astype(compute)
                 for p in planes)  # [blk, C/planes] each, empty slots zeroed
  scores = _dot(queries.rope, rope.astype(compute), 1)  # [R,blk]
  for q, plane in zip(queries.lat, planes):
    scores = scores + _dot(q, plane, 1)
  visible = holds_row & (row <= queries.positions)  # [R,blk]
  scores = jnp.where(visible, scores, -jnp.inf)

  m_new = jnp.maximum(state.m, jnp.max(scores, axis=1, keepdims=True))  # [R,1]
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing visible yet: e^(-inf) = 0
  probs = jnp.exp(scores - m_safe)  # [R,blk]
  correction = jnp.exp(state.m - m_safe)  # [R,1]
  l = state.l * correction + jnp.sum(probs, axis=1, keepdims=True)
  weights = probs.astype(compute)
  acc = tuple(a * correction + _dot(weights, plane, 0) for a, plane in zip(state.acc, planes))
  return State(m=m_new, l=l, acc=acc)
