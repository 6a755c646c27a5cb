"""Flash attention through the Pallas kernels: the operands moved to the kernels' layout and
padded, and the custom VJP that pairs a forward kernel with its backward kernels.

`kernel_flash_attention` takes layers/flash_attention.py's operands (q [B,T,H,K], k [B,S,G,K],
v [B,S,G,V], q_rope [B,T,H,R], k_rope [B,S,R], query offsets and key lengths [B], the softmax
scale already on q and q_rope) and returns the same [B,T,H,V]; layers/flash_attention.py
chooses it on TPU and GPU (jax.lax.platform_dependent, so the platform is the one a program is
lowered for, also under jax.export) and keeps its JAX path as the fallback and the reference.

What the layout does: heads before time ([B,H,T,K]: a block of one head is contiguous), T and S
padded to whole blocks (padded queries are dropped, padded slots lie past every length), slots
past a row's length zeroed once (so a NaN left in an unused cache slot cannot reach a result
through 0 * NaN), and for the Triton kernels every width padded to a power of two with zeros
(Triton's blocks are powers of two; zero columns change no dot product).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from mla_jax.kernels import flash_attention_gpu, flash_attention_tpu
from mla_jax.layers.flash_blocks import first_order_only

KERNELS = {"tpu": flash_attention_tpu, "gpu": flash_attention_gpu}


def default_blocks(platform: str) -> tuple[int, int]:
  """(block_q, block_k) of the platform's kernel."""
  return KERNELS[platform].DEFAULT_BLOCKS


def supports(platform: str, q: jax.Array, k: jax.Array, v: jax.Array,
             q_rope: Optional[jax.Array]) -> bool:
  """Whether the platform's kernel takes these operands (dtypes and widths). A zero width (MLA
  with qk_nope_head_dim = 0: RoPE on every key feature) has no tile to lay out: the JAX path
  takes it."""
  widths = (q.shape[-1], v.shape[-1]) + (() if q_rope is None else (q_rope.shape[-1],))
  return min(widths) > 0 and KERNELS[platform].supports(widths, q.dtype, v.dtype)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _attention(q, k, v, q_rope, k_rope, offsets, lengths, platform, block_q, block_k, interpret):
  return KERNELS[platform].forward(q, k, v, q_rope, k_rope, offsets, lengths, block_q=block_q,
                                   block_k=block_k, interpret=interpret)[0]


def _attention_fwd(q, k, v, q_rope, k_rope, offsets, lengths, platform, block_q, block_k,
                   interpret):
  # Guarded: a second derivative differentiates the forward pass too (its residuals).
  forward = first_order_only(functools.partial(KERNELS[platform].forward, block_q=block_q,
                                               block_k=block_k, interpret=interpret))
  out, lse = forward(q, k, v, q_rope, k_rope, offsets, lengths)
  return out, (q, k, v, q_rope, k_rope, offsets, lengths, out, lse)


def _attention_bwd(platform, block_q, block_k, interpret, residuals, d_out):
  q, k, v, q_rope, k_rope, offsets, lengths, out, lse = residuals
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # rowsum(dO o)
  backward = first_order_only(functools.partial(KERNELS[platform].backward, block_q=block_q,
                                                block_k=block_k, interpret=interpret))
  dq, dk, dv, dq_rope, dk_rope = backward(q, k, v, q_rope, k_rope, offsets, lengths, lse, d_out,
                                          delta)
  b, h, s = dk.shape[:3]
  g = k.shape[1]
  # Per query head -> per key/value head (GQA, MQA), and the rope key's share over all heads.
  group = lambda x, like: x.reshape(b, g, h // g, s, -1).sum(axis=2).astype(like.dtype)  # noqa
  dk_rope = None if k_rope is None else dk_rope.sum(axis=1).astype(k_rope.dtype)
  return dq, group(dk, k), group(dv, v), dq_rope, dk_rope, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def kernel_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                           q_rope: Optional[jax.Array], k_rope: Optional[jax.Array],
                           query_offsets: Optional[jax.Array], kv_lengths: Optional[jax.Array], *,
                           platform: str, block_q: Optional[int] = None,
                           block_k: Optional[int] = None, interpret: bool = False) -> jax.Array:
  """layers/flash_attention.py's attention through the `platform` kernel ('tpu' or 'gpu'):
  out [B,T,H,V] in v's dtype; q and q_rope already scaled. block_q / block_k: the kernel's
  (default_blocks when None). interpret: run the kernel in Pallas' interpret mode (any backend;
  for tests)."""
  b, t, h, kd = q.shape
  s, g, v_dim = k.shape[1], k.shape[2], v.shape[-1]
  default_q, default_k = default_blocks(platform)
  block_q = min(block_q or default_q, _round_up(t, KERNELS[platform].MIN_BLOCK))
  block_k = min(block_k or default_k, _round_up(s, KERNELS[platform].MIN_BLOCK))
  t_pad, s_pad = _round_up(t, block_q), _round_up(s, block_k)
  offsets = (jnp.zeros((b,), jnp.int32) if query_offsets is None
             else query_offsets.astype(jnp.int32))
  lengths = jnp.full((b,), s, jnp.int32) if kv_lengths is None else kv_lengths.astype(jnp.int32)
  width = KERNELS[platform].padded_width

  def heads_first(x: jax.Array, length: int) -> jax.Array:  # [B,L,heads,F] -> [B,heads,L',F']
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]),
                       (0, width(x.shape[3]) - x.shape[3])))

  if kv_lengths is not None:  # slots past a row's length: zeros, whatever the cache held there
    holds = jnp.arange(s)[None, :] < lengths[:, None]  # [B,S]
    k, v = (jnp.where(holds[:, :, None, None], x, jnp.zeros((), x.dtype)) for x in (k, v))
    if k_rope is not None:
      k_rope = jnp.where(holds[:, :, None], k_rope, jnp.zeros((), k_rope.dtype))
  operands = [heads_first(q, t_pad), heads_first(k, s_pad), heads_first(v, s_pad)]
  if q_rope is None:
    operands += [None, None]
  else:
    r = q_rope.shape[-1]
    operands += [heads_first(q_rope, t_pad),
                 jnp.pad(k_rope, ((0, 0), (0, s_pad - s), (0, width(r) - r)))]
  out = _attention(*operands, offsets, lengths, platform, block_q, block_k, interpret)
  return jnp.swapaxes(out[:, :, :t, :v_dim], 1, 2)  # [B,T,H,V]
