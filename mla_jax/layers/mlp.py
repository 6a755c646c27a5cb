"""The SwiGLU feed-forward block of DeepSeek's dense layers: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mla_jax.config.model import ModelConfig
from mla_jax.layers.params import ParamSpecs, cast, declare, projection


def swiglu_specs(config: ModelConfig, intermediate_size: Optional[int] = None) -> ParamSpecs:
  """gate_proj, up_proj [D,I] and down_proj [I,D]; I defaults to config.intermediate_size."""
  d, i = config.hidden_size, intermediate_size or config.intermediate_size
  return {"gate_proj": projection(config, (d, i), ("embed", "mlp")),
          "up_proj": projection(config, (d, i), ("embed", "mlp")),
          "down_proj": projection(config, (i, d), ("mlp", "embed"))}


def swiglu(config: ModelConfig, params: dict, x: jax.Array) -> jax.Array:
  """x [B,T,D] -> [B,T,D] with the weights of swiglu_specs."""
  gate = jnp.einsum("BTD,DI->BTI", x, cast(params["gate_proj"], config))
  up = jnp.einsum("BTD,DI->BTI", x, cast(params["up_proj"], config))
  return jnp.einsum("BTI,ID->BTD", nn.silu(gate) * up, cast(params["down_proj"], config))


class SwiGLU(nn.Module):
  config: ModelConfig
  intermediate_size: Optional[int] = None  # default config.intermediate_size (MoE shared: other)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B,T,D] -> [B,T,D]
    return swiglu(self.config, declare(self, swiglu_specs(self.config, self.intermediate_size)), x)
