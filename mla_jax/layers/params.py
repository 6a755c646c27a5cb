"""One way to declare a projection weight, so every layer initialises and casts alike."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mla_jax.config.model import ModelConfig


def weight(module: nn.Module, name: str, shape: tuple[int, ...]) -> jax.Array:
  """Declares a weight N(0, initializer_range) in param_dtype; returns it cast to the compute dtype.

  Weights are plain arrays named after Hugging Face's modules (q_a_proj, kv_b_proj, ...) with the
  input axes first, so converting a checkpoint is a transpose and reshape per tensor.
  """
  cfg: ModelConfig = module.config
  w = module.param(name, nn.initializers.normal(cfg.initializer_range), shape,
                   jnp.dtype(cfg.param_dtype))
  return w.astype(jnp.dtype(cfg.dtype))
