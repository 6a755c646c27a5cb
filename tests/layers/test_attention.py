"""Baseline MHA/GQA/MQA: shapes, and GQA/MQA equal MHA whose key/value heads are repeated."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mla_jax
from tests.helpers import TINY_CONFIGS, rel_err, variant

B, T = 2, 6
BASE = variant(TINY_CONFIGS["q_lora"], num_heads=6, q_lora_rank=None)


@pytest.mark.parametrize("attention, kv_heads", [("mha", 6), ("gqa", 2), ("gqa", 3), ("mqa", 1)])
def test_grouped_heads_equal_mha_with_repeated_kv_heads(attention, kv_heads):
  cfg = variant(BASE, attention=attention, num_kv_heads=kv_heads if attention == "gqa" else None)
  layer = mla_jax.MultiHeadAttention(cfg)
  x = jax.random.normal(jax.random.key(0), (B, T, cfg.hidden_size))
  params = layer.init(jax.random.key(1), x)["params"]
  d, k_dim = cfg.hidden_size, cfg.qk_head_dim
  chex.assert_shape(params["k_proj"], (d, kv_heads, k_dim))
  chex.assert_shape(params["v_proj"], (d, kv_heads, cfg.v_head_dim))
  y, _ = layer.apply({"params": params}, x)
  chex.assert_shape(y, (B, T, d))

  group = cfg.num_heads // kv_heads  # query head i reads key/value head i // group
  mha_params = dict(params, k_proj=jnp.repeat(params["k_proj"], group, axis=1),
                    v_proj=jnp.repeat(params["v_proj"], group, axis=1))
  mha = mla_jax.MultiHeadAttention(variant(BASE, attention="mha"))
  y_mha, _ = mha.apply({"params": mha_params}, x)
  assert rel_err(y, y_mha) <= 1e-6


def test_kv_cache_holds_rotated_keys_and_values():
  cfg = variant(BASE, attention="gqa", num_kv_heads=2)
  layer = mla_jax.MultiHeadAttention(cfg)
  x = jax.random.normal(jax.random.key(0), (B, T, cfg.hidden_size))
  params = layer.init(jax.random.key(1), x)["params"]
  cache = mla_jax.init_cache(cfg, B, 10).layers[0]
  _, new_cache = layer.apply({"params": params}, x, cache=cache, lengths=jnp.zeros((B,), jnp.int32))
  chex.assert_shape(new_cache.k, (B, 2, 10, cfg.qk_head_dim))  # head-major: [B,G,S,K]
  chex.assert_shape(new_cache.v, (B, 2, 10, cfg.v_head_dim))
  v_expected = jnp.einsum("BTD,DGV->BGTV", x, params["v_proj"])
  np.testing.assert_allclose(new_cache.v[:, :, :T], v_expected, rtol=1e-6, atol=1e-7)
  assert not np.any(np.asarray(new_cache.v[:, :, T:]))  # untouched slots stay empty
