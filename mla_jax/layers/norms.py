"""RMSNorm, computed in float32 whatever the activation dtype (as DeepSeek's reference does)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """x / rms(x) * scale over the last axis; the scale starts at ones like Hugging Face's."""

  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [..., F] -> [..., F]
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)  # [F]
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (normed * scale.astype(jnp.float32)).astype(self.dtype)
