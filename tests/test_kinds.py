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
