"""The attention kinds: one registry, name (model.attention) -> AttentionKind.

To add a kind (e.g. a DSA layer): write its parameter specs, its pure function and its
Linen layer in mla_jax/layers/ (the NNX module is made from the first two), its cache
type and empty-cache init in mla_jax/cache.py, and add one KINDS entry here (and its name to
config's ATTENTION_KINDS); the model, `mla-jax info`, init_cache and the bench suites ask here.

Each kind owns its parameter specs and pure function (the model's decoder_block calls it as
self_attn, for Linen and NNX alike), its Linen layer class, its
cache (what init_cache allocates per layer, and init_paged_cache per page pool, and how
`mla-jax info` describes it per token),
whether that cache may be quantized (model.cache_dtype int8 / int4), and its absorbed weights if
it has any (the "absorbed" variable collection, see layers/mla.py).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mla_jax.cache import (QMAX, Cache, LayerCache, init_kv_cache, init_latent_cache)
from mla_jax.config.model import CACHE_DTYPES, DTYPES, ModelConfig, dtype_to_name
from mla_jax.layers.attention import MultiHeadAttention, mha_attention, mha_specs
from mla_jax.layers.mla import (MultiHeadLatentAttention, mla_absorbed_weights, mla_attention,
                                mla_specs)
from mla_jax.layers.params import ParamSpecs, unbox
from mla_jax.paged_cache import PagedCache, PagedLayerCache, no_page


@dataclasses.dataclass(frozen=True)
class AttentionKind:
  """What the library needs to know about one attention kind."""

  name: str
  layer: type[nn.Module]  # the Linen module: layer(config)(x, cache=, lengths=, num_tokens=, attn_impl=)
  param_specs: Callable[[ModelConfig], ParamSpecs]  # its parameters (names, shapes, logical axes)
  # the math, pure: (config, params, x, *, cache, lengths, num_tokens, attn_impl, absorbed,
  # record) -> (y, cache); the Linen and the NNX modules both call it
  apply: Callable[..., tuple[jax.Array, Optional[LayerCache]]]
  # (config, batch_size, max_len, value dtype name) -> an empty layer cache
  init_cache: Callable[[ModelConfig, int, int, str], LayerCache]
  # config -> what one token's cache holds per layer, for `mla-jax info`
  describe_cache: Callable[[ModelConfig], str]
  quantizable: bool = False  # whether cache_dtype may be int8 / int4
  # (config, params) -> the "absorbed" collection; None: the layer has no absorbed weights
  absorbed_weights: Optional[Callable[[ModelConfig, dict], dict]] = None

  @property
  def absorbs(self) -> bool:
    """Whether the layer's 'naive' and 'absorbed' paths differ (it has absorbed weights)."""
    return self.absorbed_weights is not None


def _describe_latent(config: ModelConfig) -> str:
  return f"c_kv {config.kv_lora_rank} + k_rope {config.qk_rope_head_dim}"


def _describe_kv(config: ModelConfig) -> str:
  return f"{config.kv_heads} kv heads x (k {config.qk_head_dim} + v {config.v_head_dim})"


_MLA = AttentionKind("mla", MultiHeadLatentAttention, mla_specs, mla_attention, init_latent_cache,
                     _describe_latent, quantizable=True, absorbed_weights=mla_absorbed_weights)
# The baselines differ only in their number of key/value heads (config.kv_heads).
KINDS: dict[str, AttentionKind] = {
    "mla": _MLA,
    **{name: AttentionKind(name, MultiHeadAttention, mha_specs, mha_attention, init_kv_cache,
                           _describe_kv)
       for name in ("mha", "gqa", "mqa")},
}


def attention_kind(config: ModelConfig) -> AttentionKind:
  """The registry entry of config.attention (ModelConfig has already validated the name)."""
  try:
    return KINDS[config.attention]
  except KeyError:
    raise ValueError(f"model.attention={config.attention!r} is invalid: allowed "
                     f"{', '.join(KINDS)}") from None


def absorbed_weights(config: ModelConfig, params: dict) -> dict:
  """The "absorbed" variable collection for `params`: every MLA layer's kv_b_proj split into
  W_UK [H,N,C] and W_UV [H,C,V] (a leading layer axis in the scan layout), in config.dtype.

  Make it once per set of weights and apply with {"params": params, "absorbed": absorbed}: the
  absorbed and flash paths then read the halves without transposing them on every call
  (mla_jax/layers/mla.py's docstring). It is a copy: after the weights change (a training step, a new
  checkpoint) make it again, or the layer uses the old halves. Traceable: inside jit it follows
  the params' sharding. Returns {} for a config whose attention kind has no absorbed weights
  (mha/gqa/mqa: its registry entry has none).

  Raises ValueError, naming the problem, for: the variables dict instead of the parameter tree
  ({"params": ...}), a tree with no kv_b_proj for an MLA config, one whose layout (scanned or
  unrolled) is not config.scan_layers', or a kv_b_proj of another shape than the config's.
  """
  absorb = attention_kind(config).absorbed_weights
  return {} if absorb is None else absorb(config, unbox(params))


def _check_sizes(config: ModelConfig, batch_size: int, max_len: int) -> None:
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f"batch_size={batch_size!r} is invalid: must be a positive integer")
  if isinstance(max_len, bool) or not isinstance(max_len, int) or not 0 < max_len <= config.max_seq_len:
    raise ValueError(f"max_len={max_len!r} is invalid: must be in [1, model.max_seq_len="
                     f"{config.max_seq_len}]")


# What a cache may store: model.cache_dtype's choices, and float16, which model.dtype may give.
LAYER_CACHE_DTYPES = tuple(dict.fromkeys(CACHE_DTYPES + DTYPES))


def _cache_dtype_name(config: ModelConfig, dtype) -> str:
  """The cache dtype's name: config.kv_cache_dtype for None, else one of LAYER_CACHE_DTYPES given
  as a name or a dtype (jnp.bfloat16, np.int8, ...). Raises ValueError naming the allowed list."""
  if dtype is None:
    return config.kv_cache_dtype
  name = dtype_to_name(dtype)
  if name not in LAYER_CACHE_DTYPES:
    raise ValueError(f"cache dtype={dtype!r} is invalid: allowed "
                     f"{', '.join(LAYER_CACHE_DTYPES)} (a name or a dtype), or None for "
                     "model.cache_dtype, else model.dtype")
  return name


def init_layer_cache(config: ModelConfig, batch_size: int, max_len: int,
                     dtype: Optional[jnp.dtype] = None) -> LayerCache:
  """An empty cache for one attention layer (a LatentCache for MLA, else a KVCache). Raises
  ValueError for a batch_size or max_len out of range, a dtype not in LAYER_CACHE_DTYPES, or
  int8/int4 for an attention kind that caches K/V."""
  _check_sizes(config, batch_size, max_len)
  kind = _cache_dtype_name(config, dtype)
  attention = attention_kind(config)
  if kind in QMAX and not attention.quantizable:
    raise ValueError(f"cache dtype {kind} quantizes MLA's latent; attention={config.attention}"
                     " caches K/V: use float32 or bfloat16")
  return attention.init_cache(config, batch_size, max_len, kind)


def init_cache(config: ModelConfig, batch_size: int, max_len: int,
               dtype: Optional[jnp.dtype] = None) -> Cache:
  """An empty cache for `batch_size` sequences of up to `max_len` tokens, in the config's
  kv_cache_dtype (model.cache_dtype or else model.dtype), stored as: float32 arrays; bfloat16 as
  its uint16 bit patterns (read with load_float; see mla_jax/cache.py); int8 / int4 (packed
  two per uint8) latents with a float32 scale per token and a bfloat16 (uint16) RoPE key.
  MLA layers get a LatentCache (c_kv [B,S,C], k_rope [B,S,R]); MHA/GQA/MQA layers a KVCache,
  head-major (k [B,G,S,K], v [B,G,S,V]). dtype (a name or a dtype of LAYER_CACHE_DTYPES) overrides
  the config's; anything else, or a size out of range, raises ValueError (init_layer_cache)."""
  layers = tuple(init_layer_cache(config, batch_size, max_len, dtype)
                 for _ in range(config.num_layers))
  return Cache(layers=layers, lengths=jnp.zeros((batch_size,), jnp.int32))


def init_paged_cache(config: ModelConfig, num_pages: int, page_size: int, batch_size: int,
                     pages_per_sequence: int, dtype=None) -> PagedCache:
  """An empty PagedCache: every layer's pool of num_pages pages of page_size slots in the cache
  dtype (model.cache_dtype / model.dtype, or `dtype`), laid out as init_cache lays out
  num_pages sequences of page_size tokens; a page table [batch_size, pages_per_sequence] of
  NO_PAGE and zero lengths. Raises ValueError for sizes that are not positive integers."""
  for name, value in (("num_pages", num_pages), ("page_size", page_size),
                      ("batch_size", batch_size), ("pages_per_sequence", pages_per_sequence)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r} is invalid: must be a positive integer")
  layers = tuple(PagedLayerCache(pool=init_layer_cache(config, num_pages, page_size, dtype))
                 for _ in range(config.num_layers))
  return PagedCache(layers=layers, lengths=jnp.zeros((batch_size,), jnp.int32),
                    page_table=jnp.full((batch_size, pages_per_sequence), no_page(num_pages),
                                        jnp.int32))


def cache_bytes_per_token(config: ModelConfig) -> int:
  """Exact bytes one token occupies in the whole model's decode cache: all layers' stored
  arrays (latent + scales + RoPE key, or K and V), from the cache structure itself."""
  layer = jax.eval_shape(lambda: init_layer_cache(config, 1, 1))
  return config.num_layers * sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(layer))
