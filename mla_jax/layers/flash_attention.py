"""Flash attention for training and prefill: blocked causal attention in linear memory, with its
own backward pass (FlashAttention-2, Dao 2023), for MLA's head shapes and the baselines'.

The plain path materialises the scores [B,H,T,S] and their softmax, and the backward pass keeps
the softmax: quadratic memory in T. Here queries are cut into blocks of `block_q` rows and keys
into blocks of `block_k` slots. The forward pass walks each query block's key blocks with the
online softmax of flash-decoding (layers/flash_decode.py's loop, shared), and saves only the
output and the log-sum-exp per query (lse = m + log l). The backward pass recomputes each block's
scores and probabilities p = exp(s - lse) from them:

  dV += p^T dO     dP = dO V^T     dS = p (dP - rowsum(dO o))     dQ += dS K     dK += dS^T Q

Key blocks entirely past a query block's last visible slot are never visited (the loops' trip
counts are traced values), so causal attention costs about half of dense, and a query block of a
prefill into a cache visits only the slots it may see. Plain causal attention over a few block
pairs (training at short T, no cache; unrolled_visits says where) has counts known before
tracing (static_visits) and is unrolled instead: every block pair is its own operation, and XLA
runs independent pairs side by side (on a 2-core CPU the dots of one pair leave a core idle).

What it computes (per batch row b, query t, head h in group g = h // (H/G), key slot s):

  score = q[b,t,h] . k[b,s,g] + q_rope[b,t,h] . k_rope[b,s]          (the second term optional)
  out[b,t,h] = sum_s softmax_s(scale * score over visible s) v[b,s,g]

with s visible iff s <= query_offsets[b] + t and s < kv_lengths[b]. MLA passes its per-head
k_nope (G = H, width N) and its one shared RoPE key k_rope [B,S,R], which is never broadcast to
the heads: its term is one dot of all heads' q_rope rows against the block's k_rope. Keys (N or
N + R) and values (V) have their own widths. The baselines pass G key/value heads (MHA G = H,
GQA, MQA G = 1) and no rope term. A query that sees no slot (a padding row) gets zeros.

Layout. The operands are moved once to a block-major layout, padded to whole blocks
(layers/flash_blocks.py), so a block is a contiguous slice with B,G as its dots' batch axes.

Backends. `flash_attention` runs this JAX path on CPU, and where a kernel exists for the
operands, the Pallas kernels of mla_jax/kernels/ on TPU and GPU, chosen when the program is
lowered for a platform (jax.lax.platform_dependent); this path stays the fallback and the
reference the kernels are tested against.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax.config.model import ModelConfig
from mla_jax.layers.flash_blocks import (Blocks, balanced_block, first_order_only, from_blocks,
                                         key_blocks_to_visit, static_visits, to_blocks)
from mla_jax.layers.flash_checks import check_operands, check_scale
from mla_jax.layers.flash_decode import normalize, online_softmax_loop, zero_empty_slots
from mla_jax.layers.precision import einsum_f32

# model.flash_block_q / flash_block_k's defaults, chosen by measurement (`mla-jax bench train
# --block-sizes`, docs/flash-attention.md).
DEFAULT_BLOCK_Q = ModelConfig.flash_block_q
DEFAULT_BLOCK_K = ModelConfig.flash_block_k
# Plain causal attention (no cache) over at most this many block pairs is unrolled, where the
# pairs' float32 scores together take no more bytes than the operands (unrolled_visits).
UNROLL_MAX_PAIRS = 10


def _scores(q: jax.Array, k: jax.Array, q_rope: Optional[jax.Array],
            k_rope: Optional[jax.Array]) -> jax.Array:
  """One block's float32 scores [B,G,Q,bk]: q [B,G,Q,K] . k [B,G,bk,K], plus the shared rope
  term q_rope [B,G*Q,R] . k_rope [B,bk,R] as one dot over all heads' rows."""
  scores = einsum_f32("BGQK,BGSK->BGQS", q, k)
  if q_rope is not None:
    rope = einsum_f32("BMR,BSR->BMS", q_rope, k_rope)  # M = G*Q
    scores = scores + rope.reshape(scores.shape)
  return scores


def _key_block(blocks: Blocks, j: jax.Array, ragged: bool):
  """Key block j: ({"k", "v"} [B,G,bk,...], k_rope [B,bk,R] or None, slot [bk], holds [B,bk]);
  with ragged lengths the slots past a sequence's length are zeroed (a NaN left in an unused
  cache slot cannot leak through 0 * NaN)."""
  bk = blocks.k.shape[3]
  slot = j * bk + jnp.arange(bk)
  holds = slot[None, :] < blocks.kv_lengths[:, None]  # [B,bk]
  kv = {"k": blocks.k[j], "v": blocks.v[j]}
  k_rope = None if blocks.k_rope is None else blocks.k_rope[j]
  if ragged:
    kv = zero_empty_slots(kv, holds, seq_axis=2)
    k_rope = None if k_rope is None else zero_empty_slots(k_rope, holds, seq_axis=1)
  return kv, k_rope, slot, holds


def _forward(blocks: Blocks, ragged: bool, visits: Optional[tuple[int, ...]] = None
             ) -> tuple[jax.Array, jax.Array]:
  """(out [nq,B,G,Q,V] in v's dtype, lse [nq,B,G,Q] float32; +inf for a row that sees nothing).
  visits: the key blocks each query block sees, when known before tracing (static_visits):
  then every loop is unrolled."""
  _, b, g, rows, _ = blocks.q.shape
  v_dim = blocks.v.shape[-1]
  to_visit = key_blocks_to_visit(blocks) if visits is None else visits

  def query_block(i) -> tuple[jax.Array, jax.Array]:
    q = blocks.q[i]
    q_rope = None if blocks.q_rope is None else blocks.q_rope[i]

    def read_block(j):
      kv, k_rope, slot, holds = _key_block(blocks, j, ragged)
      return (kv, k_rope), slot, holds

    m, l, acc = online_softmax_loop(
        lambda block: _scores(q, block[0]["k"], q_rope, block[1]),
        lambda probs, block: einsum_f32("BGQS,BGSV->BGQV", probs, block[0]["v"]),
        read_block, to_visit[i], blocks.positions[i][:, None, :], acc_shape=(b, g, rows, v_dim))
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)
    return normalize(l, acc).astype(blocks.v.dtype), lse

  nq = blocks.q.shape[0]
  if visits is None:
    return jax.lax.map(query_block, jnp.arange(nq))

  def unrolled():  # independent query blocks, side by side
    outs = [query_block(i) for i in range(nq)]
    return jnp.stack([o[0] for o in outs]), jnp.stack([o[1] for o in outs])

  return _fenced(unrolled)


def _fenced(compute):
  """compute()'s outputs (a pytree of arrays), computed in one trip of a while loop, which
  fences the unrolled forward pass's block pairs off the rest of the program as the looped
  path's loops do: a remat policy around the model (e.g. dots_saveable) does not look inside
  it (in the open, it kept every pair's scores for the backward pass, memory quadratic in T).
  Inside, independent pairs still run side by side."""
  shapes = jax.eval_shape(compute)
  init = (jnp.int32(0), jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes))
  _, out = jax.lax.while_loop(lambda carry: carry[0] < 1,
                              lambda carry: (carry[0] + 1, compute()), init)
  return out


def _pair_grads(blocks: Blocks, i, kv: dict, k_rope, slot: jax.Array, holds: jax.Array,
                lse: jax.Array, d_out: jax.Array, delta: jax.Array):
  """One (query block i, key block) pair's gradient terms, the key block as _key_block reads it:
  (dQ [B,G,Q,K], dq_rope [B,G*Q,R] or None, dK [B,G,bk,K], dV [B,G,bk,V], dk_rope [B,bk,R] or
  None), float32; FlashAttention-2's backward for one block (the formulas above)."""
  _, b, g, rows, _ = blocks.q.shape
  k, v = kv["k"], kv["v"]
  q = blocks.q[i]
  q_rope = None if blocks.q_rope is None else blocks.q_rope[i]
  visible = holds[:, None, None, :] & (slot <= blocks.positions[i][:, None, :, None])
  p = jnp.where(visible, jnp.exp(_scores(q, k, q_rope, k_rope) - lse[i][..., None]), 0.0)
  d_o = d_out[i]  # [B,G,Q,V]
  dv = einsum_f32("BGQS,BGQV->BGSV", p, d_o)
  ds = p * (einsum_f32("BGQV,BGSV->BGQS", d_o, v) - delta[i][..., None])  # [B,G,Q,bk]
  dq = einsum_f32("BGQS,BGSK->BGQK", ds, k)
  dk = einsum_f32("BGQS,BGQK->BGSK", ds, q)
  dq_rope = dk_rope = None
  if q_rope is not None:
    ds_rows = ds.reshape(b, g * rows, -1)  # [B,M,bk]
    dq_rope = einsum_f32("BMS,BSR->BMR", ds_rows, k_rope)
    dk_rope = einsum_f32("BMS,BMR->BSR", ds_rows, q_rope)
  return dq, dq_rope, dk, dv, dk_rope


def _unrolled_backward(blocks: Blocks, lse: jax.Array, d_out: jax.Array, delta: jax.Array,
                       ragged: bool, visits: tuple[int, ...]):
  """_backward's float32 (dq, dq_rope, dk, dv, dk_rope) with every block pair unrolled: each
  key block's sums taken at the end (no loop carries them)."""
  nq, nk = blocks.q.shape[0], blocks.k.shape[0]
  rope = blocks.q_rope is not None
  zeros = lambda x: None if x is None else jnp.zeros(x.shape, jnp.float32)  # noqa: E731
  add = lambda a, b: None if b is None else b if a is None else a + b  # noqa: E731
  d_query = [[None, None] for _ in range(nq)]  # dQ, dq_rope per query block
  d_key = []  # (dK, dV, dk_rope) per key block
  for j in range(nk):
    kv, k_rope, slot, holds = _key_block(blocks, j, ragged)
    dk = dv = dk_rope = None
    for i in (i for i in range(nq) if visits[i] > j):
      dq_i, dq_rope_i, dk_i, dv_i, dk_rope_i = _pair_grads(blocks, i, kv, k_rope, slot, holds,
                                                           lse, d_out, delta)
      d_query[i] = [add(d_query[i][0], dq_i), add(d_query[i][1], dq_rope_i)]
      dk, dv, dk_rope = add(dk, dk_i), add(dv, dv_i), add(dk_rope, dk_rope_i)
    d_key.append((dk if dk is not None else zeros(kv["k"]),
                  dv if dv is not None else zeros(kv["v"]),
                  dk_rope if dk_rope is not None or k_rope is None else zeros(k_rope)))
  dq = jnp.stack([d[0] if d[0] is not None else zeros(blocks.q[0]) for d in d_query])
  dq_rope = None if not rope else jnp.stack(
      [d[1] if d[1] is not None else zeros(blocks.q_rope[0]) for d in d_query])
  dk, dv = (jnp.stack([d[n] for d in d_key]) for n in (0, 1))
  dk_rope = None if not rope else jnp.stack([d[2] for d in d_key])
  return dq, dq_rope, dk, dv, dk_rope


def _backward(blocks: Blocks, out: jax.Array, lse: jax.Array, d_out: jax.Array,
              ragged: bool, visits: Optional[tuple[int, ...]] = None) -> Blocks:
  """The cotangents of q, k, v, q_rope, k_rope in block layout (float32 accumulators cast to
  each operand's dtype). One pass: key blocks outer (dK, dV, dk_rope accumulated per block),
  the query blocks that see each one inner (dQ, dq_rope accumulated in place). With static
  visits every pair is unrolled and each block's sum is taken at the end."""
  nq, nk = blocks.q.shape[0], blocks.k.shape[0]
  d_out = d_out.astype(jnp.float32)
  delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)  # [nq,B,G,Q] rowsum(dO o)
  rope = blocks.q_rope is not None
  zeros = lambda x: None if x is None else jnp.zeros(x.shape, jnp.float32)  # noqa: E731
  add = lambda a, b: None if b is None else b if a is None else a + b  # noqa: E731
  if visits is not None:
    dq, dq_rope, dk, dv, dk_rope = _unrolled_backward(blocks, lse, d_out, delta, ragged, visits)
  else:
    to_visit = key_blocks_to_visit(blocks)  # [nq]
    first_query_block = jnp.sum(to_visit[None, :] <= jnp.arange(nk)[:, None],
                                axis=1)  # [nk]: the first query block that visits each key block

    def key_block(carry, j):
      dq, dq_rope = carry
      kv, k_rope, slot, holds = _key_block(blocks, j, ragged)

      def body(state):
        i, dk, dv, dk_rope, dq, dq_rope = state
        dq_i, dq_rope_i, dk_i, dv_i, dk_rope_i = _pair_grads(blocks, i, kv, k_rope, slot, holds,
                                                             lse, d_out, delta)
        dq = dq.at[i].add(dq_i)
        dq_rope = None if not rope else dq_rope.at[i].add(dq_rope_i)
        return i + 1, dk + dk_i, dv + dv_i, add(dk_rope, dk_rope_i), dq, dq_rope

      state = (first_query_block[j], zeros(kv["k"]), zeros(kv["v"]), zeros(k_rope), dq, dq_rope)
      _, dk, dv, dk_rope, dq, dq_rope = jax.lax.while_loop(lambda s: s[0] < nq, body, state)
      return (dq, dq_rope), (dk, dv, dk_rope)

    (dq, dq_rope), (dk, dv, dk_rope) = jax.lax.scan(
        key_block, (zeros(blocks.q), zeros(blocks.q_rope)), jnp.arange(nk))
  cast = lambda d, like: None if like is None else d.astype(like.dtype)  # noqa: E731
  return Blocks(q=cast(dq, blocks.q), k=cast(dk, blocks.k), v=cast(dv, blocks.v),
                q_rope=cast(dq_rope, blocks.q_rope), k_rope=cast(dk_rope, blocks.k_rope),
                positions=None, kv_lengths=None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def blocked_attention(blocks: Blocks, ragged: bool,
                      visits: Optional[tuple[int, ...]] = None) -> jax.Array:
  """Flash attention on block-layout operands: out [nq,B,G,Q,V] (v's dtype). ragged: whether
  kv_lengths may stop short of the keys (a cache), so empty slots are zeroed per block. visits:
  static_visits' counts, or None (traced counts, loops)."""
  return _forward(blocks, ragged, visits)[0]


def _blocked_attention_fwd(blocks: Blocks, ragged: bool, visits):
  out, lse = _forward(blocks, ragged, visits)
  return out, (blocks, out, lse)


def _blocked_attention_bwd(ragged: bool, visits, residuals, d_out):
  blocks, out, lse = residuals
  backward = first_order_only(functools.partial(_backward, ragged=ragged, visits=visits))
  return (backward(blocks, out, lse, d_out),)


blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


def unrolled_visits(q, k, v, q_rope, k_rope, query_offsets, kv_lengths, block_q: int,
                    block_k: int) -> Optional[tuple[int, ...]]:
  """static_visits' counts where flash attention unrolls its block pairs, else None (loops).
  Operands as flash_attention's (arrays or jax.ShapeDtypeStruct: only shapes and dtypes are
  read). Unrolled, every pair is its own operation and XLA runs independent pairs side by side,
  but it keeps the pairs' scores alive together and the program grows with the pairs. So only
  plain causal attention (no query_offsets, no kv_lengths) over at most UNROLL_MAX_PAIRS pairs
  is unrolled, and only where all pairs' float32 scores [B,H,block_q,block_k] take no more bytes
  than q, k, v, q_rope and k_rope: the extra temporaries then stay on the order of the operands
  the layer holds anyway (docs/flash-attention.md; a test holds the gradient's extra
  temporaries to the operands' bytes)."""
  if query_offsets is not None or kv_lengths is not None:
    return None
  b, t, h, _ = q.shape
  bq, bk = balanced_block(t, block_q), balanced_block(t, block_k)
  visits = static_visits(t, bq, bk, -(-t // bk))
  scores = sum(visits) * b * h * bq * bk * 4  # bytes
  operands = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in (q, k, v, q_rope, k_rope) if x is not None)
  return visits if sum(visits) <= UNROLL_MAX_PAIRS and scores <= operands else None


def xla_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                        q_rope: Optional[jax.Array] = None, k_rope: Optional[jax.Array] = None,
                        query_offsets: Optional[jax.Array] = None,
                        kv_lengths: Optional[jax.Array] = None,
                        block_q: int = DEFAULT_BLOCK_Q,
                        block_k: int = DEFAULT_BLOCK_K) -> jax.Array:
  """flash_attention's JAX path (any backend): the reference the kernels are tested against.
  Arguments as flash_attention's."""
  check_operands(q, k, v, q_rope, k_rope, query_offsets, kv_lengths, block_q, block_k)
  check_scale(scale)
  b, t, h, _ = q.shape
  # The scale goes on the queries once (outside the custom VJP, so autodiff carries it).
  q = q * jnp.asarray(scale, q.dtype)
  q_rope = None if q_rope is None else q_rope * jnp.asarray(scale, q_rope.dtype)
  blocks = to_blocks(q, k, v, q_rope, k_rope, query_offsets, kv_lengths, block_q, block_k)
  visits = unrolled_visits(q, k, v, q_rope, k_rope, query_offsets, kv_lengths, block_q, block_k)
  out = blocked_attention(blocks, kv_lengths is not None, visits)
  return from_blocks(out, t, h)


IMPLEMENTATIONS = ("auto", "xla", "pallas_tpu", "pallas_gpu")


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                    q_rope: Optional[jax.Array] = None, k_rope: Optional[jax.Array] = None,
                    query_offsets: Optional[jax.Array] = None,
                    kv_lengths: Optional[jax.Array] = None, block_q: int = DEFAULT_BLOCK_Q,
                    block_k: int = DEFAULT_BLOCK_K, implementation: str = "auto",
                    interpret: bool = False) -> jax.Array:
  """Causal attention in memory linear in T, differentiable: out [B,T,H,V] in v's dtype.

  q [B,T,H,K]; k [B,S,G,K] and v [B,S,G,V] with G key/value heads (H a multiple of G; head h
  reads group h // (H/G)); q_rope [B,T,H,R] and k_rope [B,S,R] (optional, together): a score
  term shared by all heads (MLA's RoPE key). scale: the softmax scale (config.softmax_scale,
  YaRN's mscale included). query_offsets [B] int: query t of row b is at position
  query_offsets[b] + t among the keys, the tokens cached before it (default 0, which needs
  S = T); kv_lengths [B] int: slots holding keys (default all S). Slot s is visible to query t
  of row b iff s <= query_offsets[b] + t and s < kv_lengths[b]; a query that sees nothing gets
  zeros.

  implementation: 'auto' runs, in the program lowered for each platform, the Pallas kernel of
  mla_jax/kernels/ on TPU and GPU where it takes the operands, and this module's JAX path
  elsewhere; 'xla' the JAX path; 'pallas_tpu' / 'pallas_gpu' that kernel (interpret=True runs
  it in Pallas' interpret mode, on any backend: for tests). block_q / block_k: rows and slots
  per block of the JAX path (the kernels use their own, kernels.flash_attention.default_blocks).

  Raises ValueError (check_operands) for operands whose shapes do not fit each other, integer
  q/k/v, empty operands, non-integer offsets or lengths, concrete kv_lengths outside [0, S],
  block sizes that are not positive integers, a scale that is not a real number, an unknown
  implementation or a kernel named that does not take the operands (kernels.supports);
  negative query_offsets where concrete. First derivatives only: a second derivative through
  it raises NotImplementedError in reverse mode (grad of grad) and JAX's TypeError in forward
  mode (jax.hessian, jvp of grad); the naive path has them. Source:
  FlashAttention-2 (Dao 2023), algorithms 1 and 2.
  """
  as_array = lambda x: None if x is None else jnp.asarray(x)  # noqa: E731  lists, scalars
  query_offsets, kv_lengths = as_array(query_offsets), as_array(kv_lengths)
  check_operands(q, k, v, q_rope, k_rope, query_offsets, kv_lengths, block_q, block_k)
  check_scale(scale)
  block_q, block_k = int(block_q), int(block_k)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} is invalid: allowed "
                     f"{', '.join(IMPLEMENTATIONS)}")
  xla = functools.partial(xla_flash_attention, scale=scale, query_offsets=query_offsets,
                          kv_lengths=kv_lengths, block_q=block_q, block_k=block_k)
  if implementation == "xla":
    return xla(q, k, v, q_rope=q_rope, k_rope=k_rope)
  from mla_jax.kernels import flash_attention as kernels  # Pallas, only where a kernel may run

  def kernel(platform: str):
    def run(q, k, v, q_rope, k_rope):
      scaled = lambda x: None if x is None else x * jnp.asarray(scale, x.dtype)  # noqa: E731
      return kernels.kernel_flash_attention(scaled(q), k, v, scaled(q_rope), k_rope,
                                            query_offsets, kv_lengths, platform=platform,
                                            interpret=interpret)
    return run

  if implementation != "auto":
    platform = implementation.removeprefix("pallas_")
    if not kernels.supports(platform, q, k, v, q_rope):
      widths = (q.shape[-1], v.shape[-1]) + (() if q_rope is None else (q_rope.shape[-1],))
      raise ValueError(
          f"implementation={implementation!r} does not take these operands (q {q.dtype}, "
          f"v {v.dtype}; key, value{', rope' if q_rope is not None else ''} widths {widths}): "
          f"see kernels.flash_attention_{platform}.supports; implementation='auto' falls back "
          "to the JAX path where a kernel does not fit, 'xla' always runs it")
    return kernel(platform)(q, k, v, q_rope, k_rope)
  by_platform = {name: kernel(platform) for name, platform in (("tpu", "tpu"), ("cuda", "gpu"))
                 if kernels.supports(platform, q, k, v, q_rope)}
  if not by_platform:
    return xla(q, k, v, q_rope=q_rope, k_rope=k_rope)
  return jax.lax.platform_dependent(
      q, k, v, q_rope, k_rope, default=lambda q, k, v, q_rope, k_rope: xla(
          q, k, v, q_rope=q_rope, k_rope=k_rope), **by_platform)
