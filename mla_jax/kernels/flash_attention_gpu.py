"""Flash attention forward and backward as Pallas GPU (Triton) kernels, for MLA's head shapes.

The arithmetic and the layout are flash_attention_tpu.py's (its docstring): scores as two dots,
q . k_nope and q_rope . k_rope, the one [B,S,R] rope key read by every head's program; values of
their own width; heads before time; offsets and lengths per row. The program structure is
Triton's, as in jax.experimental.pallas.ops.gpu.attention: one program per (query block, row,
head) walks the key blocks it may see in a loop (its trip count the row's own), keeping the
running max, sum and output in registers; the backward pass is one program per (key block, row,
head) accumulating dK, dV and the rope key's share over the query blocks that see it, and one
per (query block, row, head) accumulating dQ over key blocks.

Triton's blocks are powers of two: the caller pads every width (padded_width) and T and S to
whole blocks. Triton rather than Mosaic GPU: it runs on every CUDA GPU since Ampere, Mosaic GPU
wants Hopper or newer. cuDNN's fused attention (jax.nn.dot_product_attention with
implementation='cudnn') is not used: it takes only float16/bfloat16, needs values as wide as
keys (MLA's 128 against 192, so padded), has no per-row query offset for a prefill into a cache,
and cannot be lowered where no cuDNN is installed, so a program using it could not be checked
here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

DEFAULT_BLOCKS = (64, 64)  # (block_q, block_k): Triton's registers hold a 64 x 64 score tile
MIN_BLOCK = 16  # the smallest tile Triton's dot takes


def padded_width(n: int) -> int:
  """A width as the kernels take it: the next power of two (at least 16)."""
  return max(pl.next_power_of_2(n), MIN_BLOCK)


def supports(widths: tuple[int, ...], q_dtype, v_dtype) -> bool:
  """float32, bfloat16 or float16 operands, each width at most 256 once padded (a row of a
  block stays in registers)."""
  floats = (jnp.float32, jnp.bfloat16, jnp.float16)
  return (jnp.dtype(q_dtype) in map(jnp.dtype, floats) and jnp.dtype(v_dtype) in map(jnp.dtype, floats)
          and all(padded_width(w) <= 256 for w in widths))


def _visible(offset, length, i, block_q: int):
  """One past the last slot a query of query block i may see."""
  return jnp.minimum(offset + (i + 1) * block_q, length)


def _mask(offset, length, i, j, block_q: int, block_k: int) -> jax.Array:
  rows = offset + i * block_q + jnp.arange(block_q)
  slots = j * block_k + jnp.arange(block_k)
  return (slots[None, :] <= rows[:, None]) & (slots[None, :] < length)


def _block(ref, start, size):
  return ref[pl.ds(start, size), :]


def _keys(k_ref, k_rope_ref, j, block_k):
  """Key block j: (k [bk,K], k_rope [bk,R] or None)."""
  k_rope = None if k_rope_ref is None else _block(k_rope_ref, j * block_k, block_k)
  return _block(k_ref, j * block_k, block_k), k_rope


def _scores(q, q_rope, k, k_rope):
  s = plgpu.dot(q, k.T)
  if q_rope is not None:
    s += plgpu.dot(q_rope, k_rope.T)
  return s


def _forward_kernel(offsets_ref, lengths_ref, *refs, block_q, block_k, rope):
  if rope:
    q_ref, k_ref, v_ref, q_rope_ref, k_rope_ref, o_ref, lse_ref = refs
  else:
    (q_ref, k_ref, v_ref, o_ref, lse_ref), q_rope_ref, k_rope_ref = refs, None, None
  i = pl.program_id(0)
  offset, length = offsets_ref[...], lengths_ref[...]
  q = q_ref[...]
  q_rope = None if q_rope_ref is None else q_rope_ref[...]

  def body(j, carry):
    acc, m, l = carry
    s = _scores(q, q_rope, *_keys(k_ref, k_rope_ref, j, block_k))
    s = jnp.where(_mask(offset, length, i, j, block_q, block_k), s, -jnp.inf)
    m_next = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    p = jnp.exp(s - m_safe[:, None])
    alpha = jnp.exp(m - m_safe)
    v = _block(v_ref, j * block_k, block_k)
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_next, l * alpha + jnp.sum(p, axis=1)

  num_blocks = pl.cdiv(jnp.maximum(_visible(offset, length, i, block_q), 0), block_k)
  acc, m, l = lax.fori_loop(
      0, num_blocks, body,
      (jnp.zeros((block_q, o_ref.shape[-1]), jnp.float32),
       jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32)))
  seen = l > 0
  o_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)


def _score_grads(offset, length, i, j, q, q_rope, k, k_rope, v, lse, do, delta, block_q,
                 block_k):
  """One block's probabilities p = exp(s - lse) (0 where masked) and the scores' gradient
  dS = p (dO V^T - rowsum(dO o)): both [bq,bk] float32."""
  p = jnp.exp(_scores(q, q_rope, k, k_rope) - lse[:, None])
  p = jnp.where(_mask(offset, length, i, j, block_q, block_k), p, 0.0)
  return p, p * (plgpu.dot(do, v.T) - delta[:, None])


def _dkv_kernel(offsets_ref, lengths_ref, *refs, block_q, block_k, rope):
  if rope:
    (q_ref, k_ref, v_ref, q_rope_ref, k_rope_ref, lse_ref, do_ref, delta_ref,
     dk_ref, dv_ref, dk_rope_ref) = refs
  else:
    (q_ref, k_ref, v_ref, lse_ref, do_ref, delta_ref, dk_ref, dv_ref) = refs
    q_rope_ref = k_rope_ref = dk_rope_ref = None
  j = pl.program_id(0)
  offset, length = offsets_ref[...], lengths_ref[...]
  num_q = q_ref.shape[0] // block_q
  v = _block(v_ref, j * block_k, block_k)
  k, k_rope = _keys(k_ref, k_rope_ref, j, block_k)

  def body(i, carry):
    dk, dv, dk_rope = carry
    q = _block(q_ref, i * block_q, block_q)
    q_rope = None if q_rope_ref is None else _block(q_rope_ref, i * block_q, block_q)
    do = _block(do_ref, i * block_q, block_q)
    rows = pl.ds(i * block_q, block_q)
    p, ds = _score_grads(offset, length, i, j, q, q_rope, k, k_rope, v, lse_ref[rows], do,
                         delta_ref[rows], block_q, block_k)
    dv = dv + plgpu.dot(p.astype(do.dtype).T, do)
    dk = dk + plgpu.dot(ds.astype(q.dtype).T, q)
    if q_rope is not None:
      dk_rope = dk_rope + plgpu.dot(ds.astype(q_rope.dtype).T, q_rope)
    return dk, dv, dk_rope

  first = jnp.clip((j * block_k - offset) // block_q, 0, num_q)
  zeros = lambda ref: jnp.zeros((block_k, ref.shape[-1]), jnp.float32)  # noqa: E731
  dk, dv, dk_rope = lax.fori_loop(
      first, jnp.where(j * block_k < length, num_q, first), body,
      (zeros(dk_ref), zeros(dv_ref), None if dk_rope_ref is None else zeros(dk_rope_ref)))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  if dk_rope_ref is not None:
    dk_rope_ref[...] = dk_rope.astype(dk_rope_ref.dtype)


def _dq_kernel(offsets_ref, lengths_ref, *refs, block_q, block_k, rope):
  if rope:
    (q_ref, k_ref, v_ref, q_rope_ref, k_rope_ref, lse_ref, do_ref, delta_ref,
     dq_ref, dq_rope_ref) = refs
  else:
    (q_ref, k_ref, v_ref, lse_ref, do_ref, delta_ref, dq_ref) = refs
    q_rope_ref = k_rope_ref = dq_rope_ref = None
  i = pl.program_id(0)
  offset, length = offsets_ref[...], lengths_ref[...]
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  q_rope = None if q_rope_ref is None else q_rope_ref[...]

  def body(j, carry):
    dq, dq_rope = carry
    k, k_rope = _keys(k_ref, k_rope_ref, j, block_k)
    _, ds = _score_grads(offset, length, i, j, q, q_rope, k, k_rope,
                         _block(v_ref, j * block_k, block_k), lse, do, delta, block_q, block_k)
    dq = dq + plgpu.dot(ds.astype(k.dtype), k)
    if q_rope is not None:
      dq_rope = dq_rope + plgpu.dot(ds.astype(k_rope.dtype), k_rope)
    return dq, dq_rope

  num_blocks = pl.cdiv(jnp.maximum(_visible(offset, length, i, block_q), 0), block_k)
  dq, dq_rope = lax.fori_loop(
      0, num_blocks, body,
      (jnp.zeros(q.shape, jnp.float32),
       None if q_rope is None else jnp.zeros(q_rope.shape, jnp.float32)))
  dq_ref[...] = dq.astype(dq_ref.dtype)
  if dq_rope_ref is not None:
    dq_rope_ref[...] = dq_rope.astype(dq_rope_ref.dtype)


def _row(block: int, width=None):  # one query block of one (row, head): [B,H,T(,F)] operands
  if width is None:
    return pl.BlockSpec((None, None, block), lambda x, b, h: (b, h, x))
  return pl.BlockSpec((None, None, block, width), lambda x, b, h: (b, h, x, 0))


def _whole(length: int, width: int, group: int):  # a whole sequence of key/value head h // J
  return pl.BlockSpec((None, None, length, width), lambda x, b, h: (b, h // group, 0, 0))


def _whole_query(length: int, width=None):
  if width is None:
    return pl.BlockSpec((None, None, length), lambda x, b, h: (b, h, 0))
  return pl.BlockSpec((None, None, length, width), lambda x, b, h: (b, h, 0, 0))


def _scalar():
  return pl.BlockSpec((None,), lambda x, b, h: (b,))


def _call(kernel, grid, specs_in, specs_out, shapes_out, operands, interpret, name):
  return pl.pallas_call(kernel, grid=grid, in_specs=[_scalar(), _scalar()] + specs_in,
                        out_specs=specs_out, out_shape=shapes_out,
                        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
                        interpret=interpret, name=name)(*operands)


def forward(q, k, v, q_rope, k_rope, offsets, lengths, *, block_q, block_k, interpret=False):
  """(out [B,H,T,V] in v's dtype, lse [B,H,T] float32)."""
  b, h, t, kd = q.shape
  g, s, v_dim = k.shape[1], k.shape[2], v.shape[-1]
  rope = q_rope is not None
  specs_in = [_row(block_q, kd), _whole(s, kd, h // g), _whole(s, v_dim, h // g)]
  operands = [offsets, lengths, q, k, v]
  if rope:
    r = q_rope.shape[-1]
    specs_in += [_row(block_q, r), pl.BlockSpec((None, s, r), lambda x, b_, h_: (b_, 0, 0))]
    operands += [q_rope, k_rope]
  kernel = functools.partial(_forward_kernel, block_q=block_q, block_k=block_k, rope=rope)
  return _call(kernel, (t // block_q, b, h), specs_in, [_row(block_q, v_dim), _row(block_q)],
               [jax.ShapeDtypeStruct((b, h, t, v_dim), v.dtype),
                jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
               operands, interpret, "mla_flash_attention_fwd")


def backward(q, k, v, q_rope, k_rope, offsets, lengths, lse, d_out, delta, *, block_q, block_k,
             interpret=False):
  """Cotangents of forward: dq [B,H,T,K] and dq_rope [B,H,T,R] in q's dtype; per query head
  and float32, dk [B,H,S,K], dv [B,H,S,V] and dk_rope [B,H,S,R] (the caller sums them over the
  heads that share a key). delta [B,H,T] float32: rowsum(dO o)."""
  b, h, t, kd = q.shape
  g, s, v_dim = k.shape[1], k.shape[2], v.shape[-1]
  rope = q_rope is not None
  r = q_rope.shape[-1] if rope else 0
  operands = [offsets, lengths, q, k, v] + ([q_rope, k_rope] if rope else []) + [lse, d_out,
                                                                                delta]
  rope_key = [pl.BlockSpec((None, s, r), lambda x, b_, h_: (b_, 0, 0))] if rope else []
  widths = [kd, v_dim] + ([r] if rope else [])
  per_head = _call(
      functools.partial(_dkv_kernel, block_q=block_q, block_k=block_k, rope=rope),
      (s // block_k, b, h),
      [_whole_query(t, kd), _whole(s, kd, h // g), _whole(s, v_dim, h // g)]
      + ([_whole_query(t, r)] if rope else []) + rope_key
      + [_whole_query(t), _whole_query(t, v_dim), _whole_query(t)],
      [_row(block_k, w) for w in widths],
      [jax.ShapeDtypeStruct((b, h, s, w), jnp.float32) for w in widths],
      operands, interpret, "mla_flash_attention_dkv")
  q_widths = [kd] + ([r] if rope else [])
  dq = _call(
      functools.partial(_dq_kernel, block_q=block_q, block_k=block_k, rope=rope),
      (t // block_q, b, h),
      [_row(block_q, kd), _whole(s, kd, h // g), _whole(s, v_dim, h // g)]
      + ([_row(block_q, r)] if rope else []) + rope_key
      + [_row(block_q), _row(block_q, v_dim), _row(block_q)],
      [_row(block_q, w) for w in q_widths],
      [jax.ShapeDtypeStruct((b, h, t, w), x.dtype) for w, x in zip(q_widths, (q, q_rope))],
      operands, interpret, "mla_flash_attention_dq")
  return dq[0], *per_head[:2], (dq[1] if rope else None), (per_head[2] if rope else None)
