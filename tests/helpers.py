"""Small shared pieces for the tests: tiny configs, an error measure, flash attention operands."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from mla_jax.config import ModelConfig

YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}

# Three MLA shapes: no query compression with an odd head count and V != N; query compression;
# odd heads with YaRN.
TINY_CONFIGS = {
    "no_q_lora_odd_heads": ModelConfig(
        vocab_size=97, hidden_size=48, num_layers=2, num_heads=3, q_lora_rank=None,
        kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
        intermediate_size=96, max_seq_len=64),
    "q_lora": ModelConfig(
        vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        intermediate_size=128, max_seq_len=64),
    "q_lora_yarn_5_heads": ModelConfig(
        vocab_size=97, hidden_size=40, num_layers=2, num_heads=5, q_lora_rank=16,
        kv_lora_rank=20, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
        intermediate_size=80, max_seq_len=64, rope_scaling=YARN),
}


def variant(config: ModelConfig, **changes) -> ModelConfig:
  return dataclasses.replace(config, **changes)


def rel_err(actual, expected) -> float:
  """max |actual - expected| / max |expected|: relative to the tensor's scale, not per element."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


DATA = Path(__file__).resolve().parents[1] / "mla_jax"  # the library's own sources: real text
SMALL_MODEL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
               "model.q_lora_rank=16", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8",
               "model.qk_rope_head_dim=8", "model.v_head_dim=8", "model.intermediate_size=64",
               "model.max_seq_len=64"]  # overrides for a model that trains in seconds


def flash_operands(b, t, s, h, g, k_dim, v_dim, r, seed=0):
  """Random flash_attention operands: q [B,T,H,K], k [B,S,G,K], v [B,S,G,V], q_rope [B,T,H,R]
  and k_rope [B,S,R] (None for r = 0), float32."""
  import jax

  keys = jax.random.split(jax.random.key(seed), 5)
  return (jax.random.normal(keys[0], (b, t, h, k_dim)), jax.random.normal(keys[1], (b, s, g, k_dim)),
          jax.random.normal(keys[2], (b, s, g, v_dim)),
          jax.random.normal(keys[3], (b, t, h, r)) if r else None,
          jax.random.normal(keys[4], (b, s, r)) if r else None)
