"""Flash attention forward and backward as Pallas TPU (Mosaic) kernels, for MLA's head shapes.

The stock TPU kernels (jax.experimental.pallas.ops.tpu.flash_attention, splash attention) want
one head width, a multiple of 128, for queries, keys and values; MLA's keys are N + R = 128 + 64
wide and its values V = 128. Rather than padding the keys to 256 (a third more score FLOPs and
key bytes) this kernel splits the score in two dots, q . k_nope (width N) and q_rope . k_rope
(width R), each block of k_rope read once for all heads' programs from its own [B,S,R] array
(never broadcast to the heads), and values keep their own width V. The arithmetic is
layers/flash_attention.py's (FlashAttention-2): a forward kernel saving the output and the
log-sum-exp per query, and two backward kernels recomputing each block's probabilities, one
accumulating dK, dV (and the rope key's share per head) over query blocks, one dQ over key blocks.

Layout (head-major, as the kernels read blocks): q [B,H,T,K], k [B,G,S,K], v [B,G,S,V],
q_rope [B,H,T,R], k_rope [B,S,R]; T and S padded to whole blocks by the caller; the softmax
scale already on q and q_rope. Per row b: queries at positions offsets[b] + t, keys in slots
< lengths[b]; both arrays are scalar-prefetched into SMEM, and a key block no query of a query
block can see is neither computed (pl.when) nor fetched (its index map repeats the last block
needed, so the pipeline issues no new copy). Grid: (B, H, query blocks, key blocks) for the
forward and dQ, (B, H, key blocks, query blocks) for dK/dV; the last axis accumulates in VMEM.

Per-row statistics (running max and sum, log-sum-exp, rowsum(dO o)) are kept 128 lanes wide,
as the stock kernel keeps them, so every vector op is lane-dense. Block sizes must be multiples
of 128 (the caller pads T and S to them); `supports` says which operands fit.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
NT = (((1,), (1,)), ((), ()))  # contract the last dims: [M,K] x [N,K] -> [M,N]
# (block_q, block_k): the stock kernel's 128 x 128 tiles; not tuned on a TPU (none was at hand).
DEFAULT_BLOCKS = (128, 128)
MIN_BLOCK = LANES  # block sizes are multiples of 128 (a score tile is lane-dense)


def padded_width(n: int) -> int:
  """Widths are taken as they are (a block's last dim is the whole width)."""
  return n


def supports(widths: tuple[int, ...], q_dtype, v_dtype) -> bool:
  """float32 or bfloat16 operands, and widths (keys, values, rope) each below 128 or a
  multiple of it, so a 128-lane row statistic slices or tiles onto them."""
  floats = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
  return (jnp.dtype(q_dtype) in floats and jnp.dtype(v_dtype) in floats
          and all(w < LANES or w % LANES == 0 for w in widths))


def _lanes(x: jax.Array, width: int) -> jax.Array:
  """A [rows,128] lane-replicated statistic as [rows,width]."""
  if width <= LANES:
    return x[:, :width]
  return jnp.tile(x, (1, width // LANES))


def _visible(offsets_ref, lengths_ref, b, i, block_q: int):
  """One past the last slot a query of query block i of row b may see."""
  return jnp.minimum(offsets_ref[b] + (i + 1) * block_q, lengths_ref[b])


def _first_query_block(offsets_ref, b, j, block_q: int, block_k: int, num_q: int):
  """The first query block that sees key block j of row b (clamped to the grid). Divisions of
  non-negative values by lax.div: floor division of a signed one lowers to a sign op that
  Mosaic only lowers knowing the TPU generation."""
  return jnp.minimum(lax.div(jnp.maximum(j * block_k - offsets_ref[b], 0), block_q), num_q - 1)


def _last_key_block(offsets_ref, lengths_ref, b, i, block_q: int, block_k: int):
  """The last key block query block i of row b sees (0 when it sees none)."""
  visible = jnp.maximum(_visible(offsets_ref, lengths_ref, b, i, block_q), 1)
  return lax.div(visible + block_k - 1, block_k) - 1


def _mask(offsets_ref, lengths_ref, b, i, j, block_q: int, block_k: int) -> jax.Array:
  shape = (block_q, block_k)
  rows = offsets_ref[b] + i * block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
  slots = j * block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
  return (slots <= rows) & (slots < lengths_ref[b])


def _scores(q_ref, k_ref, q_rope_ref, k_rope_ref) -> jax.Array:
  s = lax.dot_general(q_ref[...], k_ref[...], NT, preferred_element_type=jnp.float32)
  if q_rope_ref is not None:
    s += lax.dot_general(q_rope_ref[...], k_rope_ref[...], NT, preferred_element_type=jnp.float32)
  return s


def _forward_kernel(offsets_ref, lengths_ref, *refs, block_q, block_k, rope):
  if rope:
    q_ref, k_ref, v_ref, q_rope_ref, k_rope_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
  else:
    (q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc), q_rope_ref, k_rope_ref = refs, None, None
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _start():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(j * block_k < _visible(offsets_ref, lengths_ref, b, i, block_q))
  def _block():
    s = _scores(q_ref, k_ref, q_rope_ref, k_rope_ref)
    s = jnp.where(_mask(offsets_ref, lengths_ref, b, i, j, block_q, block_k), s, -jnp.inf)
    m_prev = m_sc[...]  # [bq,128]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1)[:, None])
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # a row that saw nothing yet: exp(-inf)
    p = jnp.exp(s - _lanes(m_safe, block_k))
    alpha = jnp.exp(m_prev - m_safe)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1)[:, None]
    m_sc[...] = m_next
    v = v_ref[...]
    acc_sc[...] = acc_sc[...] * _lanes(alpha, v.shape[-1]) + jnp.dot(
        p.astype(v.dtype), v, preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(3) - 1)
  def _store():
    l = l_sc[...]
    seen = l > 0
    o_ref[...] = (acc_sc[...] / _lanes(jnp.where(seen, l, 1.0), o_ref.shape[-1])).astype(
        o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)


def _score_grads(offsets_ref, lengths_ref, b, i, j, q_ref, k_ref, v_ref, q_rope_ref, k_rope_ref,
                 lse_ref, do_ref, delta_ref, block_q, block_k) -> tuple[jax.Array, jax.Array]:
  """One block's probabilities p = exp(s - lse) (0 where masked) and the scores' gradient
  dS = p (dO V^T - rowsum(dO o)): both [bq,bk] float32."""
  s = _scores(q_ref, k_ref, q_rope_ref, k_rope_ref)
  p = jnp.exp(s - _lanes(lse_ref[...], block_k))
  p = jnp.where(_mask(offsets_ref, lengths_ref, b, i, j, block_q, block_k), p, 0.0)
  dp = lax.dot_general(do_ref[...], v_ref[...], NT, preferred_element_type=jnp.float32)
  return p, p * (dp - _lanes(delta_ref[...], block_k))


def _dkv_kernel(offsets_ref, lengths_ref, *refs, block_q, block_k, rope):
  if rope:
    (q_ref, k_ref, v_ref, q_rope_ref, k_rope_ref, lse_ref, do_ref, delta_ref,
     dk_ref, dv_ref, dk_rope_ref, dk_sc, dv_sc, dk_rope_sc) = refs
  else:
    (q_ref, k_ref, v_ref, lse_ref, do_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc) = refs
    q_rope_ref = k_rope_ref = dk_rope_ref = dk_rope_sc = None
  b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(i == 0)
  def _start():
    for sc in (dk_sc, dv_sc, dk_rope_sc):
      if sc is not None:
        sc[...] = jnp.zeros(sc.shape, jnp.float32)

  @pl.when(j * block_k < _visible(offsets_ref, lengths_ref, b, i, block_q))
  def _block():
    p, ds = _score_grads(offsets_ref, lengths_ref, b, i, j, q_ref, k_ref, v_ref, q_rope_ref,
                         k_rope_ref, lse_ref, do_ref, delta_ref, block_q, block_k)
    do = do_ref[...]
    dv_sc[...] += jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    q = q_ref[...]
    dk_sc[...] += jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)
    if rope:
      q_rope = q_rope_ref[...]
      dk_rope_sc[...] += jnp.dot(ds.T.astype(q_rope.dtype), q_rope,
                                 preferred_element_type=jnp.float32)

  @pl.when(i == pl.num_programs(3) - 1)
  def _store():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)
    if rope:
      dk_rope_ref[...] = dk_rope_sc[...].astype(dk_rope_ref.dtype)


def _dq_kernel(offsets_ref, lengths_ref, *refs, block_q, block_k, rope):
  if rope:
    (q_ref, k_ref, v_ref, q_rope_ref, k_rope_ref, lse_ref, do_ref, delta_ref,
     dq_ref, dq_rope_ref, dq_sc, dq_rope_sc) = refs
  else:
    (q_ref, k_ref, v_ref, lse_ref, do_ref, delta_ref, dq_ref, dq_sc) = refs
    q_rope_ref = k_rope_ref = dq_rope_ref = dq_rope_sc = None
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _start():
    for sc in (dq_sc, dq_rope_sc):
      if sc is not None:
        sc[...] = jnp.zeros(sc.shape, jnp.float32)

  @pl.when(j * block_k < _visible(offsets_ref, lengths_ref, b, i, block_q))
  def _block():
    _, ds = _score_grads(offsets_ref, lengths_ref, b, i, j, q_ref, k_ref, v_ref, q_rope_ref,
                         k_rope_ref, lse_ref, do_ref, delta_ref, block_q, block_k)
    k = k_ref[...]
    dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
    if rope:
      k_rope = k_rope_ref[...]
      dq_rope_sc[...] += jnp.dot(ds.astype(k_rope.dtype), k_rope,
                                 preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(3) - 1)
  def _store():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)
    if rope:
      dq_rope_ref[...] = dq_rope_sc[...].astype(dq_rope_ref.dtype)


class _Specs:
  """Block specs of one grid order: `query_major` (b, h, i, j) or key-major (b, h, j, i)."""

  def __init__(self, shapes, block_q, block_k, query_major):
    (_, h, t, _), g, r, _ = shapes
    self.block_q, self.block_k, self.query_major = block_q, block_k, query_major
    self.group, self.num_q, self.r = h // g, t // block_q, r

  def _ij(self, x, y):
    return (x, y) if self.query_major else (y, x)

  def query(self, width):  # [B,H,T,width] blocks of one query block
    def index(b, h, x, y, offsets, lengths):
      i, j = self._ij(x, y)
      if not self.query_major:  # skipped query blocks repeat the first one needed
        i = jnp.maximum(i, _first_query_block(offsets, b, j, self.block_q, self.block_k,
                                              self.num_q))
      return (b, h, i, 0)
    return pl.BlockSpec((None, None, self.block_q, width), index)

  def _key_block(self, b, x, y, offsets, lengths):
    i, j = self._ij(x, y)
    if self.query_major:  # skipped key blocks repeat the last one needed
      j = jnp.minimum(j, _last_key_block(offsets, lengths, b, i, self.block_q, self.block_k))
    return j

  def key(self, width):  # [B,G,S,width] blocks: query head h reads key/value head h // J
    def index(b, h, x, y, offsets, lengths):
      return (b, lax.div(h, self.group), self._key_block(b, x, y, offsets, lengths), 0)
    return pl.BlockSpec((None, None, self.block_k, width), index)

  def rope_key(self):  # [B,S,R]: the one k_rope every head reads
    def index(b, h, x, y, offsets, lengths):
      return (b, self._key_block(b, x, y, offsets, lengths), 0)
    return pl.BlockSpec((None, self.block_k, self.r), index)

  def key_out(self, width):  # [B,H,S,width]: per query head, summed over heads by the caller
    return pl.BlockSpec((None, None, self.block_k, width),
                        lambda b, h, x, y, offsets, lengths: (b, h, self._ij(x, y)[1], 0))

  def query_out(self, width):
    return pl.BlockSpec((None, None, self.block_q, width),
                        lambda b, h, x, y, offsets, lengths: (b, h, self._ij(x, y)[0], 0))


def _call(kernel, grid, specs_in, specs_out, shapes_out, scratch, operands, offsets, lengths,
          interpret, name):
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid, in_specs=specs_in,
                                             out_specs=specs_out, scratch_shapes=scratch),
      out_shape=shapes_out,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret, name=name)(offsets, lengths, *operands)


def _shapes(q, k, v, q_rope):
  return q.shape, k.shape[1], 0 if q_rope is None else q_rope.shape[-1], v.shape[-1]


def forward(q, k, v, q_rope, k_rope, offsets, lengths, *, block_q, block_k, interpret=False):
  """(out [B,H,T,V] in v's dtype, lse [B,H,T] float32)."""
  b, h, t, kd = q.shape
  s, v_dim = k.shape[2], v.shape[-1]
  rope = q_rope is not None
  specs = _Specs(_shapes(q, k, v, q_rope), block_q, block_k, query_major=True)
  specs_in = [specs.query(kd), specs.key(kd), specs.key(v_dim)]
  operands = [q, k, v]
  if rope:
    specs_in += [specs.query(q_rope.shape[-1]), specs.rope_key()]
    operands += [q_rope, k_rope]
  kernel = functools.partial(_forward_kernel, block_q=block_q, block_k=block_k, rope=rope)
  statistic = pltpu.VMEM((block_q, LANES), jnp.float32)  # running max and sum, lane-replicated
  out, lse = _call(kernel, (b, h, t // block_q, s // block_k), specs_in,
                   [specs.query_out(v_dim), specs.query_out(LANES)],
                   [jax.ShapeDtypeStruct((b, h, t, v_dim), v.dtype),
                    jax.ShapeDtypeStruct((b, h, t, LANES), jnp.float32)],
                   [statistic, statistic, pltpu.VMEM((block_q, v_dim), jnp.float32)],
                   operands, offsets, lengths, interpret, "mla_flash_attention_fwd")
  return out, lse[..., 0]  # the kernel writes it lane-replicated; one lane is kept


def backward(q, k, v, q_rope, k_rope, offsets, lengths, lse, d_out, delta, *, block_q, block_k,
             interpret=False):
  """Cotangents of forward: dq [B,H,T,K] and dq_rope [B,H,T,R] in q's dtype; per query head
  and float32, dk [B,H,S,K], dv [B,H,S,V] and dk_rope [B,H,S,R] (the caller sums them over the
  heads that share a key). delta [B,H,T] float32: rowsum(dO o)."""
  b, h, t, kd = q.shape
  g, s, v_dim = k.shape[1], k.shape[2], v.shape[-1]
  rope = q_rope is not None
  r = q_rope.shape[-1] if rope else 0
  lse, delta = (jnp.broadcast_to(x[..., None], (b, h, t, LANES)) for x in (lse, delta))
  operands = [q, k, v] + ([q_rope, k_rope] if rope else []) + [lse, d_out, delta]

  def inputs(specs):
    return ([specs.query(kd), specs.key(kd), specs.key(v_dim)]
            + ([specs.query(r), specs.rope_key()] if rope else [])
            + [specs.query(LANES), specs.query(v_dim), specs.query(LANES)])

  key_major = _Specs(_shapes(q, k, v, q_rope), block_q, block_k, query_major=False)
  widths = [kd, v_dim] + ([r] if rope else [])
  per_head = _call(
      functools.partial(_dkv_kernel, block_q=block_q, block_k=block_k, rope=rope),
      (b, h, s // block_k, t // block_q), inputs(key_major),
      [key_major.key_out(w) for w in widths],
      [jax.ShapeDtypeStruct((b, h, s, w), jnp.float32) for w in widths],
      [pltpu.VMEM((block_k, w), jnp.float32) for w in widths],
      operands, offsets, lengths, interpret, "mla_flash_attention_dkv")
  query_major = _Specs(_shapes(q, k, v, q_rope), block_q, block_k, query_major=True)
  q_widths = [kd] + ([r] if rope else [])
  dq = _call(
      functools.partial(_dq_kernel, block_q=block_q, block_k=block_k, rope=rope),
      (b, h, t // block_q, s // block_k), inputs(query_major),
      [query_major.query_out(w) for w in q_widths],
      [jax.ShapeDtypeStruct((b, h, t, w), x.dtype) for w, x in zip(q_widths, (q, q_rope))],
      [pltpu.VMEM((block_q, w), jnp.float32) for w in q_widths],
      operands, offsets, lengths, interpret, "mla_flash_attention_dq")
  return dq[0], *per_head[:2], (dq[1] if rope else None), (per_head[2] if rope else None)
