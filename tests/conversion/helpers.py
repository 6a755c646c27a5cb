"""Source models for the conversion tests: small random MHA/GQA/MQA baselines whose logits are far
from trivial (weights larger than init, norms away from 1) and whose hidden states are large
next to the block norms' epsilon (embeddings of unit scale), the regime where the conversion at
full rank is exact (docs/conversion.md)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import mla_jax
from mla_jax.config import ModelConfig

# G=2 kv heads of 16 no-RoPE + 16 RoPE key features and 16 value features: the keys' no-RoPE part
# and the values are 2 x (16 + 16) = 64 wide, the hidden size, so full rank is the latent's
# largest width too.
GQA = ModelConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, attention="gqa",
                  num_kv_heads=2, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=16,
                  qk_rope_head_dim=16, v_head_dim=16, intermediate_size=96, max_seq_len=128)


def source(config: ModelConfig = GQA, weight_scale: float = 2.5, seed: int = 0):
  """(model, params) of a random baseline."""
  model = mla_jax.Transformer(config)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
  keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))

  def scale(path, x):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return 1 + 0.2 * jax.random.normal(next(keys), x.shape)
    return x * (50.0 if "embed_tokens" in name else weight_scale)  # embeddings of std 1

  return model, jax.tree_util.tree_map_with_path(scale, params)


def variant(**changes) -> ModelConfig:
  return dataclasses.replace(GQA, **changes)


TOKENS = np.random.default_rng(0).integers(0, 97, (2, 48))


def logits(config: ModelConfig, params, attn_impl: str = "naive") -> np.ndarray:
  return np.asarray(mla_jax.Transformer(config).apply({"params": params}, jnp.asarray(TOKENS),
                                                      attn_impl=attn_impl)[0])
