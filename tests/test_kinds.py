"""The attention-kind registry: one entry per name config accepts, owning its layer and cache."""

import jax
import pytest

from mla_jax.cache import KVCache, LatentCache
from mla_jax.config import ATTENTION_KINDS
from mla_jax.kinds import KINDS, attention_kind, init_layer_cache
from mla_jax.layers.attention import MultiHeadAttention
from mla_jax.layers.mla import MultiHeadLatentAttention
from tests.helpers import TINY_CONFIGS, variant


def test_registry_names_equal_configs_attention_kinds():
  assert tuple(KINDS) == ATTENTION_KINDS
  assert all(kind.name == name for name, kind in KINDS.items())


@pytest.mark.parametrize("name", ATTENTION_KINDS)
def test_each_kind_owns_its_layer_and_cache(name):
  cfg = variant(TINY_CONFIGS["q_lora"], attention=name,
                num_kv_heads=2 if name == "gqa" else None)
  kind = attention_kind(cfg)
  layer = jax.eval_shape(lambda: init_layer_cache(cfg, 1, 4))
  latent = kind.layer is MultiHeadLatentAttention
  assert latent or kind.layer is MultiHeadAttention
  assert isinstance(layer, LatentCache if latent else KVCache)
  assert kind.quantizable == kind.absorbs == latent


@pytest.mark.parametrize("dtype, shown", [("int5", "'int5'"), ("bf16", "'bf16'"), (3, "3"),
                                          ("uint8", "'uint8'")])
def test_unknown_cache_dtypes_are_named_with_the_allowed_list(dtype, shown):
  """An unknown dtype used to reach the cache constructors (a KeyError or a raw array of it)."""
  import re

  from mla_jax.kinds import init_cache

  with pytest.raises(ValueError, match="^" + re.escape(
      f"cache dtype={shown} is invalid: allowed float32, bfloat16, int8, int4, float16 (a name or "
      "a dtype), or None for model.cache_dtype, else model.dtype") + "$"):
    init_cache(TINY_CONFIGS["q_lora"], 1, 4, dtype)


def test_cache_dtypes_may_be_names_or_dtypes():
  import jax.numpy as jnp

  from mla_jax.kinds import init_cache

  cfg = TINY_CONFIGS["q_lora"]
  assert init_cache(cfg, 1, 4, jnp.bfloat16).layers[0].dtype == jnp.bfloat16
  assert init_cache(cfg, 1, 4, "int4").layers[0].dtype == jnp.int4
  assert init_cache(cfg, 1, 4, "float16").layers[0].c_kv.dtype == jnp.float16
