"""Flash attention's block layout (layers/flash_attention.py): the operands moved once to a
block-major layout ([blocks,B,G,rows,K]) so a block is a contiguous slice and every block dot has
B,G as leading batch dimensions (the layout XLA's CPU dots read without a transposed copy,
layers/flash_decode.py); the query rows of one group are its heads' rows, time-major. T and S
are padded up to whole blocks; padded key slots lie past kv_lengths and padded queries (position
-1) see nothing. Also which key blocks each query block sees: traced (key_blocks_to_visit) or,
for plain causal attention, known before tracing (static_visits). And first_order_only, the
guard every flash attention backward pass (JAX path and kernels) returns through."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp


class Blocks(NamedTuple):
  """The operands in block-major layout (Q = block_q * J query rows per group, time-major)."""

  q: jax.Array  # [nq,B,G,Q,K]
  k: jax.Array  # [nk,B,G,bk,K]
  v: jax.Array  # [nk,B,G,bk,V]
  q_rope: Optional[jax.Array]  # [nq,B,G*Q,R] (rows g-major), or None
  k_rope: Optional[jax.Array]  # [nk,B,bk,R], or None
  positions: jax.Array  # [nq,B,Q] int32: each row's query position; -1 for padding rows
  kv_lengths: jax.Array  # [B] int32


def balanced_block(length: int, block: int) -> int:
  """The rows per block flash attention cuts `length` rows into, given blocks of at most
  `block`: as many blocks as `block` needs, made even (rounded up to a multiple of 8 rows where
  that stays within `block`), so padding wastes under 8 rows per block rather than up to
  block - 1: 257 tokens at blocks of 256 make 2 blocks of 136, not 2 of 256 (three pairs of
  256 x 256 scores for 257 tokens cost more than the naive path's one 257 x 257)."""
  n = -(-length // block)
  even = -(-length // n)
  if n == 1:
    return even  # one block of exactly `length` rows: no padding
  return min(block, -(-even // 8) * 8)


def to_blocks(q, k, v, q_rope, k_rope, query_offsets, kv_lengths, block_q: int,
              block_k: int) -> Blocks:
  """The operands of flash_attention (q [B,T,H,K], k [B,S,G,K], v [B,S,G,V], q_rope [B,T,H,R],
  k_rope [B,S,R], query_offsets [B], kv_lengths [B]) in block-major layout, padded to whole
  blocks of balanced_block(T, block_q) rows and balanced_block(S, block_k) slots. Linear ops
  only, so autodiff moves the gradients back through them for free."""
  b, t, h, _ = q.shape
  s, g = k.shape[1], k.shape[2]
  j = h // g  # query heads per key/value head
  bq, bk = balanced_block(t, block_q), balanced_block(s, block_k)

  def blocked(x: jax.Array, size: int, fill=0) -> jax.Array:  # [B,L,...] -> [n,B,size,...]
    n = -(-x.shape[1] // size)
    pad = [(0, 0), (0, n * size - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, pad, constant_values=fill)
    return jnp.moveaxis(x.reshape((x.shape[0], n, size) + x.shape[2:]), 1, 0)

  def query_rows(x: jax.Array) -> jax.Array:  # [B,T,H,F] -> [nq,B,G,bq*J,F]
    x = blocked(x.reshape(b, t, g, j, x.shape[-1]), bq)  # [nq,B,bq,G,J,F]
    x = jnp.moveaxis(x, 3, 2)  # [nq,B,G,bq,J,F]
    return x.reshape(x.shape[:3] + (bq * j, x.shape[-1]))

  def key_slots(x: jax.Array) -> jax.Array:  # [B,S,G,F] -> [nk,B,G,bk,F]
    return jnp.moveaxis(blocked(x, bk), 3, 2)

  if query_offsets is None:
    query_offsets = jnp.zeros((b,), jnp.int32)
  query_positions = query_offsets.astype(jnp.int32)[:, None] + jnp.arange(t, dtype=jnp.int32)
  if kv_lengths is None:
    kv_lengths = jnp.full((b,), s, jnp.int32)
  positions = blocked(query_positions.astype(jnp.int32), bq, fill=-1)  # [nq,B,bq]
  positions = jnp.repeat(positions, j, axis=2)  # [nq,B,bq*J]: row t*J + j is at time t
  q_rope_blocks = k_rope_blocks = None
  if q_rope is not None:
    q_rope_blocks = query_rows(q_rope)  # [nq,B,G,Q,R]
    q_rope_blocks = q_rope_blocks.reshape(q_rope_blocks.shape[:2] + (-1, q_rope.shape[-1]))
    k_rope_blocks = blocked(k_rope, bk)  # [nk,B,bk,R]
  return Blocks(q=query_rows(q), k=key_slots(k), v=key_slots(v), q_rope=q_rope_blocks,
                k_rope=k_rope_blocks, positions=positions, kv_lengths=kv_lengths.astype(jnp.int32))


def from_blocks(out: jax.Array, t: int, h: int) -> jax.Array:
  """[nq,B,G,bq*J,V] -> [B,T,H,V] (head h = g*J + j), padding rows dropped."""
  nq, b, g, rows, v = out.shape
  j = h // g
  out = out.reshape(nq, b, g, rows // j, j, v)
  out = jnp.transpose(out, (1, 0, 3, 2, 4, 5))  # [B,nq,bq,G,J,V]
  return out.reshape(b, -1, h, v)[:, :t]


def key_blocks_to_visit(blocks: Blocks) -> jax.Array:
  """[nq] int32: how many key blocks (from the first) hold a slot some row of each query block
  may see; nondecreasing in the block index, so the backward pass can invert it."""
  bk = blocks.k.shape[3]
  last = jnp.max(blocks.positions, axis=2) + 1  # [nq,B]: one past each block's last position
  seen = jnp.max(jnp.minimum(last, blocks.kv_lengths[None, :]), axis=1)  # [nq]
  seen = jax.lax.cummax(jnp.maximum(seen, 0), axis=0)
  return (seen + bk - 1) // bk


def static_visits(t: int, bq: int, bk: int, nk: int) -> tuple[int, ...]:
  """The key blocks each query block sees in plain causal attention (queries at 0..t-1 over
  their own keys): query block i's last row is at min((i+1) bq, t) - 1. key_blocks_to_visit
  computes the same counts from traced positions."""
  nq = -(-t // bq)
  return tuple(min(nk, -(-min((i + 1) * bq, t) // bk)) for i in range(nq))


def first_order_only(backward: Callable) -> Callable:
  """backward (a flash attention pass, usually the backward one: array pytrees in, array
  pytrees out; static arguments bound beforehand) as a function whose own derivative is a clear
  error. The backward passes (the JAX path's loops, the one-trip loop around its unrolled pairs,
  the Pallas kernels) and the kernels' forward passes cannot be differentiated in reverse mode;
  wrapped, a second derivative through flash attention raises NotImplementedError the same way
  for every T, block size and backend, naming the path that has one."""
  guarded = jax.custom_vjp(backward)

  def refuse(_, d_grads):
    raise NotImplementedError(
        "flash attention has first derivatives only (jax.grad, jax.vjp); a second derivative "
        "through it (grad of grad, Hessian-vector products) needs the naive attention: "
        "attn_impl='naive' (train.attn_impl=naive)")

  guarded.defvjp(lambda *args: (backward(*args), None), refuse)
  return guarded
