"""flash_attention's argument checks (layers/flash_attention.py): operands whose shapes, dtypes
or sizes do not fit, offsets and lengths out of range where they are concrete, block sizes that
are not positive integers, and a softmax scale that is not a real number; each a ValueError
that names the argument, raised before any block is laid out."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def check_operands(q: jax.Array, k: jax.Array, v: jax.Array, q_rope: Optional[jax.Array],
                   k_rope: Optional[jax.Array], query_offsets: Optional[jax.Array],
                   kv_lengths: Optional[jax.Array], block_q: int, block_k: int) -> None:
  """Raises ValueError naming the operand whose shape, dtype or size does not fit: shapes that
  disagree, integer queries, keys or values (the scale would be truncated), empty batches or
  sequences, non-integer offsets or lengths, negative query_offsets or kv_lengths past S
  (checked where concrete; traced ones must stay in range), block sizes that are not positive
  integers."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"flash_attention takes q [B,T,H,K], k [B,S,G,K], v [B,S,G,V]; got ranks "
                     f"{q.ndim}, {k.ndim}, {v.ndim}")
  for name, x in (("q", q), ("k", k), ("v", v), ("q_rope", q_rope), ("k_rope", k_rope)):
    if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} has dtype {x.dtype}: flash_attention needs floating-point "
                       "operands (float32, bfloat16, float16)")
  b, t, h, kd = q.shape
  s, g = k.shape[1], k.shape[2]
  if min(b, t, s, h) == 0:
    raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)}: the batch, the query and key "
                     "lengths and the heads must be non-empty")
  if k.shape[0] != b or k.shape[3] != kd:
    raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}: expected "
                     f"[{b},S,G,{kd}]")
  if v.shape[:3] != (b, s, g):
    raise ValueError(f"v {tuple(v.shape)} does not fit k {tuple(k.shape)}: expected "
                     f"[{b},{s},{g},V]")
  if h % g:
    raise ValueError(f"q has {h} heads and k {g} key/value heads: H must be a multiple of G")
  if (q_rope is None) != (k_rope is None):
    raise ValueError("q_rope and k_rope go together: give both or neither")
  if q_rope is not None:
    r = q_rope.shape[-1]
    if q_rope.shape != (b, t, h, r) or k_rope.shape != (b, s, r):
      raise ValueError(f"q_rope {tuple(q_rope.shape)} / k_rope {tuple(k_rope.shape)} do not "
                       f"fit: expected [{b},{t},{h},R] and [{b},{s},R]")
  for name, x in (("query_offsets", query_offsets), ("kv_lengths", kv_lengths)):
    if x is None:
      continue
    if x.shape != (b,):
      raise ValueError(f"{name} has shape {tuple(x.shape)}, expected [{b}]")
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} has dtype {x.dtype}: expected integer token counts")
  if query_offsets is not None and not isinstance(query_offsets, jax.core.Tracer):
    offsets = np.asarray(query_offsets)
    if offsets.min() < 0:
      raise ValueError(f"query_offsets holds {offsets.tolist()}: each must be >= 0, the tokens "
                       "cached before the row's first query")
  if kv_lengths is not None and not isinstance(kv_lengths, jax.core.Tracer):
    lengths = np.asarray(kv_lengths)
    if lengths.max() > s or lengths.min() < 0:
      raise ValueError(f"kv_lengths holds {lengths.tolist()}: each must be in [0, S={s}], the "
                       "key slots k has")
  if query_offsets is None and s != t:
    raise ValueError(f"without query_offsets queries are at 0..T-1 over their own keys, but "
                     f"T={t} and S={s}: pass query_offsets for queries into a cache")
  for name, size in (("block_q", block_q), ("block_k", block_k)):
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
      raise ValueError(f"{name}={size!r} is invalid: must be a positive integer")


def check_scale(scale) -> None:
  """Raises ValueError unless scale is a real number: a Python or NumPy scalar, or a 0-d
  integer or floating array (traced or not)."""
  shape = getattr(scale, "shape", None)
  dtype = getattr(scale, "dtype", None)
  real = (isinstance(scale, (int, float)) and not isinstance(scale, bool)) or (
      shape == () and dtype is not None and (jnp.issubdtype(dtype, jnp.floating)
                                             or jnp.issubdtype(dtype, jnp.integer)))
  if not real:
    raise ValueError(f"scale={scale!r} is invalid: flash_attention needs the softmax scale as a "
                     "real number (e.g. config.softmax_scale, 1/sqrt(K) times YaRN's mscale^2)")
