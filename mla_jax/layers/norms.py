"""RMSNorm, computed in float32 whatever the activation dtype (as DeepSeek's reference does)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mla_jax.layers.params import declare, norm_specs


def rms_norm(params: dict, x: jax.Array, eps: float, dtype=jnp.float32) -> jax.Array:
  """x [..., F] / rms(x) * params['scale'] [F] over the last axis -> [..., F] in `dtype`."""
  xf = x.astype(jnp.float32)
  normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (normed * jnp.asarray(params["scale"]).astype(jnp.float32)).astype(dtype)


class RMSNorm(nn.Module):
  """x / rms(x) * scale over the last axis; the scale starts at ones like Hugging Face's."""

  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [..., F] -> [..., F]
    params = declare(self, norm_specs(x.shape[-1], self.param_dtype))
    return rms_norm(params, x, self.eps, self.dtype)
