"""Einsums that accumulate in float32 whatever the operands' dtype (scores, softmax sums, logits)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """jnp.einsum with a float32 result and float32 accumulation.

  On accelerators this is preferred_element_type (bf16 operands, f32 accumulators). XLA's CPU
  runtime rejects some bf16 x bf16 -> f32 dot layouts ("Unsupported element type for
  DotThunk"), so there the operands are widened first: products of bf16 values are exact in
  float32, so the result is the same.
  """
  if jax.default_backend() == "cpu":
    return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
