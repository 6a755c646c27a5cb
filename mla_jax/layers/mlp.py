"""The SwiGLU feed-forward block of DeepSeek's dense layers: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mla_jax.config.model import ModelConfig
from mla_jax.layers.params import weight


class SwiGLU(nn.Module):
  config: ModelConfig
  intermediate_size: Optional[int] = None  # default config.intermediate_size (MoE shared: other)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B,T,D] -> [B,T,D]
    cfg = self.config
    d, i = cfg.hidden_size, self.intermediate_size or cfg.intermediate_size
    gate = jnp.einsum("BTD,DI->BTI", x, weight(self, "gate_proj", (d, i)))
    up = jnp.einsum("BTD,DI->BTI", x, weight(self, "up_proj", (d, i)))
    return jnp.einsum("BTI,ID->BTD", nn.silu(gate) * up, weight(self, "down_proj", (i, d)))
