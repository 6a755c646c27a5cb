import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mla_jax
from mla_jax.cache import cache_bytes, write_tokens
from mla_jax.config import ModelConfig
from tests.helpers import TINY_CONFIGS, variant

PRESETS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_latent_cache_bytes_are_exactly_the_formula(dtype):
  cfg = TINY_CONFIGS["q_lora"]
  b, s = 3, 40
  cache = mla_jax.init_cache(cfg, b, s, dtype=dtype)
  itemsize = jnp.dtype(dtype).itemsize
  latent = cfg.num_layers * b * s * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * itemsize
  assert cache_bytes(cache) == latent + cache.lengths.nbytes
  assert cache.lengths.dtype == jnp.int32 and cache.lengths.shape == (b,)
  layer = cache.layers[0]
  assert layer.c_kv.shape == (b, s, cfg.kv_lora_rank) and layer.k_rope.shape == (b, s, cfg.qk_rope_head_dim)
  assert len(cache.layers) == cfg.num_layers and cache.max_len == s and cache.batch_size == b


@pytest.mark.parametrize("attention, kv_heads", [("mha", None), ("gqa", 2), ("mqa", None)])
def test_baseline_cache_bytes(attention, kv_heads):
  cfg = variant(TINY_CONFIGS["q_lora"], attention=attention, num_kv_heads=kv_heads)
  cache = mla_jax.init_cache(cfg, 2, 8)
  per_token = cfg.kv_heads * (cfg.qk_head_dim + cfg.v_head_dim)
  assert cache_bytes(cache) - cache.lengths.nbytes == cfg.num_layers * 2 * 8 * per_token * 4


@pytest.mark.parametrize("attention, kv_heads", [("mha", None), ("gqa", 2), ("mqa", None)])
def test_baseline_cache_is_head_major(attention, kv_heads):
  """K [B,G,S,K] and V [B,G,S,V]: each head's tokens contiguous, S on axis 2 (KVCache.seq_axis)."""
  cfg = variant(TINY_CONFIGS["q_lora"], attention=attention, num_kv_heads=kv_heads)
  cache = mla_jax.init_cache(cfg, 3, 8)
  layer = cache.layers[0]
  assert layer.k.shape == (3, cfg.kv_heads, 8, cfg.qk_head_dim)
  assert layer.v.shape == (3, cfg.kv_heads, 8, cfg.v_head_dim)
  assert layer.seq_axis == 2 and cache.max_len == 8 and cache.batch_size == 3


def _shape_only_cache(cfg, b=1, s=1):
  return jax.eval_shape(lambda: mla_jax.init_cache(cfg, b, s))


def test_deepseek_v2_preset_caches_576_elements_per_token_per_layer():
  cfg = mla_jax.load_config(PRESETS / "deepseek_v2.yaml").model
  cache = _shape_only_cache(cfg)
  per_layer = sum(x.size for x in jax.tree_util.tree_leaves(cache.layers[0]))
  assert per_layer == 576  # kv_lora_rank 512 + rope 64
  assert sum(x.size for x in jax.tree_util.tree_leaves(cache.layers)) == 34_560  # x 60 layers
  # The same count for a long context, from shapes alone (nothing is allocated).
  long = _shape_only_cache(cfg, b=8, s=cfg.max_seq_len)
  assert sum(x.size for x in jax.tree_util.tree_leaves(long.layers)) == 34_560 * 8 * cfg.max_seq_len


def test_mha_with_128_heads_of_128_caches_32768_per_layer():
  cfg = ModelConfig(attention="mha", num_heads=128, hidden_size=128, qk_nope_head_dim=64,
                    qk_rope_head_dim=64, v_head_dim=128, num_layers=60, max_seq_len=16)
  cache = _shape_only_cache(cfg)
  assert sum(x.size for x in jax.tree_util.tree_leaves(cache.layers[0])) == 32_768  # 2 * 128 * 128
  mla = _shape_only_cache(mla_jax.load_config(PRESETS / "deepseek_v2.yaml").model)
  mla_total = sum(x.size for x in jax.tree_util.tree_leaves(mla.layers))
  assert mla_total / (32_768 * 60) == pytest.approx(0.0176, abs=1e-4)  # 576 / 32768


def test_write_tokens_places_each_row_at_its_own_offset_and_drops_overflow():
  buf = jnp.zeros((2, 5, 1))
  new = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])[..., None]
  out = write_tokens(buf, new, jnp.array([0, 3]))[..., 0]
  np.testing.assert_array_equal(out, [[1, 2, 3, 0, 0], [0, 0, 0, 4, 5]])  # 6 is past S: dropped


def test_write_tokens_along_the_head_major_sequence_axis():
  """Into [B,G,S,K] at axis 2: every head of row b gets its tokens at start[b] .., nothing else
  changes, and writes past S are dropped."""
  b, g, s, k, t = 2, 3, 6, 2, 3
  buf = jnp.full((b, g, s, k), -1.0)
  new = jnp.arange(b * g * t * k, dtype=jnp.float32).reshape(b, g, t, k)  # [B,G,T,K]
  out = np.asarray(write_tokens(buf, new, jnp.array([1, 4]), axis=2))
  want = np.full((b, g, s, k), -1.0)
  want[0, :, 1:4] = new[0]
  want[1, :, 4:6] = new[1, :, :2]  # the third token would land at slot 6 = S: dropped
  np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0, max_len=8), "batch_size=0"),
    (dict(batch_size=2.0, max_len=8), "batch_size=2.0"),
    (dict(batch_size=2, max_len=0), "max_len=0"),
    (dict(batch_size=2, max_len=65), r"max_len=65 .*max_seq_len=64"),
])
def test_init_cache_rejects_bad_sizes(kwargs, message):
  with pytest.raises(ValueError, match=message):
    mla_jax.init_cache(TINY_CONFIGS["q_lora"], **kwargs)


def test_cache_is_a_pytree_that_round_trips():
  cache = mla_jax.init_cache(TINY_CONFIGS["q_lora"], 2, 8)
  leaves, treedef = jax.tree_util.tree_flatten(cache)
  assert len(leaves) == 2 * TINY_CONFIGS["q_lora"].num_layers + 1
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert dataclasses.fields(rebuilt) and rebuilt.max_len == 8
