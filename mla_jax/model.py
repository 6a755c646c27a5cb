"""Decoder-only Transformer LM: tokens [B,T] (+ cache) -> logits [B,T,V] (+ cache).

Pre-norm blocks of attention (MLA or a baseline) and a SwiGLU MLP or DeepSeekMoE, a final
RMSNorm and an untied LM head, as in DeepSeek-V2/V3. Used functionally: the cache is an argument and a return
value, never hidden module state, so one jitted function serves prefill and decode.

Layer loop. Unrolled (default): parameters `layers_0` .. `layers_{L-1}`, one block each in the
program. With model.scan_layers, the repeated blocks (all layers, or those after the
first_k_dense_replace dense ones of a DeepSeekMoE model, which stay unrolled as `layers_{i}`) have
their parameters stacked on a leading `layers` axis under the one name `layers`, and run as one
nn.scan: the program holds one block whatever the depth. stack_layers / unstack_layers convert
parameters (and optimizer moments, any tree of the same layout) between the two.

The cache stays a tuple of per-layer caches in both layouts. Under scan its per-layer arrays
are stacked on entry and split on exit (tree_map, whatever the per-layer cache's fields):
measured, that copies the cache a few times per call, where the unrolled loop updates it in
place, so decoding is best done with the unrolled layout (docs/moe.md, "Scan over layers").
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mla_jax.cache import Cache, LayerCache
from mla_jax.config.model import ModelConfig
from mla_jax.kinds import attention_kind
from mla_jax.layers.mlp import SwiGLU
from mla_jax.layers.moe import DeepSeekMoE
from mla_jax.layers.norms import RMSNorm
from mla_jax.layers.precision import einsum_f32
from mla_jax.sharding import constrain


REMAT_POLICIES = {  # train.remat -> jax.checkpoint policy (None: save nothing but block inputs)
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderBlock(nn.Module):
  config: ModelConfig
  layer: int = 0  # decides dense MLP or DeepSeekMoE (first_k_dense_replace)
  attn_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, cache: Optional[LayerCache], lengths: Optional[jax.Array],
               num_tokens: Optional[jax.Array]) -> tuple[jax.Array, Optional[LayerCache]]:
    """x [B,T,D] -> (x [B,T,D], this layer's updated cache or None)."""
    cfg = self.config
    attn_impl = self.attn_impl
    dtype = jnp.dtype(cfg.dtype)
    attention = attention_kind(cfg).layer
    normed = RMSNorm(cfg.rms_norm_eps, dtype, cfg.param_dtype, name="input_layernorm")(x)
    attn_out, cache = attention(cfg, name="self_attn")(
        normed, cache=cache, lengths=lengths, num_tokens=num_tokens, attn_impl=attn_impl)
    x = x + attn_out
    normed = RMSNorm(cfg.rms_norm_eps, dtype, cfg.param_dtype, name="post_attention_layernorm")(x)
    mlp = DeepSeekMoE(cfg, name="mlp") if cfg.is_moe_layer(self.layer) else SwiGLU(cfg, name="mlp")
    return x + mlp(normed), cache


def _is_concrete(x: jax.Array) -> bool:
  return not isinstance(x, jax.core.Tracer)


def first_scanned_layer(config: ModelConfig) -> int:
  """Index of the first layer of the scanned group: the dense first_k_dense_replace layers of a
  DeepSeekMoE model differ in structure and stay unrolled."""
  return config.first_k_dense_replace if config.n_routed_experts is not None else 0


def stack_layers(config: ModelConfig, params: dict[str, Any]) -> dict[str, Any]:
  """Unrolled parameters {'layers_i': ...} -> the scan layout: `layers_i` kept below
  first_scanned_layer, the rest stacked on a new leading axis under 'layers'. Other keys pass
  through. Raises ValueError when a layer is missing or the tree is already stacked."""
  start = first_scanned_layer(config)
  names = [f"layers_{i}" for i in range(start, config.num_layers)]
  missing = [n for n in names if n not in params]
  if missing or "layers" in params:
    raise ValueError(f"stack_layers needs the unrolled layout with {names[0]} .. {names[-1]}; "
                     f"missing {missing[:3]}" + (", and 'layers' is already there" * ("layers" in params)))
  out = {k: v for k, v in params.items() if k not in names}
  out["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *(params[n] for n in names))
  return out


def unstack_layers(config: ModelConfig, params: dict[str, Any]) -> dict[str, Any]:
  """The inverse of stack_layers: 'layers' [L',...] -> layers_{start} .. layers_{L-1}."""
  if "layers" not in params:
    raise ValueError("unstack_layers needs the scan layout: no 'layers' entry in the tree")
  start = first_scanned_layer(config)
  out = {k: v for k, v in params.items() if k != "layers"}
  for j in range(config.num_layers - start):
    out[f"layers_{start + j}"] = jax.tree_util.tree_map(lambda x, j=j: x[j], params["layers"])
  return out


class Transformer(nn.Module):
  """`logits, cache = model.apply({'params': p}, tokens, cache=None, attn_impl='auto')`.

  Without a cache: a causal forward over tokens [B,T]; returns (logits [B,T,V] float32, None).
  With a cache: the tokens go after each sequence's cached length, positions come from the cache,
  and the returned cache holds them. num_tokens [B] (optional, with a cache) says how many of each
  row's T tokens are real, for prompts of different lengths padded on the right.
  """

  config: ModelConfig
  remat: str = "none"  # train.remat: none | full | dots_saveable | ... (REMAT_POLICIES)

  @nn.compact
  def __call__(self, tokens: jax.Array, cache: Optional[Cache] = None, attn_impl: str = "auto",
               num_tokens: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[Cache]]:
    cfg = self.config
    self._check_inputs(tokens, cache, num_tokens)
    b, t = tokens.shape
    if cache is not None and num_tokens is None:
      num_tokens = jnp.full((b,), t, jnp.int32)
    lengths = None if cache is None else cache.lengths

    embed = self.param("embed_tokens", nn.initializers.normal(cfg.initializer_range),
                       (cfg.vocab_size, cfg.hidden_size), jnp.dtype(cfg.param_dtype))  # [V,D]
    batch_axis = "batch" if cache is None else "cache_batch"  # decode batches follow the cache
    x = jnp.take(embed, tokens, axis=0).astype(jnp.dtype(cfg.dtype))  # [B,T,D]
    block = self._block_class()
    scan_from = first_scanned_layer(cfg) if cfg.scan_layers else cfg.num_layers
    new_layers = []
    for i in range(scan_from):
      layer_cache = None if cache is None else cache.layers[i]
      x, layer_cache = block(cfg, i, attn_impl, name=f"layers_{i}")(x, layer_cache, lengths,
                                                                    num_tokens)
      new_layers.append(layer_cache)
    if scan_from < cfg.num_layers:
      x, scanned = self._scan(block, x, None if cache is None else cache.layers[scan_from:],
                              lengths, num_tokens, attn_impl, scan_from)
      new_layers += scanned
    x = RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype), cfg.param_dtype, name="norm")(x)
    lm_head = self.param("lm_head", nn.initializers.normal(cfg.initializer_range),
                         (cfg.hidden_size, cfg.vocab_size), jnp.dtype(cfg.param_dtype))  # [D,V]
    logits = constrain(einsum_f32("BTD,DV->BTV", x, lm_head.astype(x.dtype)),
                       (batch_axis, None, "vocab"))
    if cache is None:
      return logits, None
    return logits, Cache(layers=tuple(new_layers), lengths=cache.lengths + num_tokens)

  def _block_class(self) -> type[nn.Module]:
    if self.remat == "none":
      return DecoderBlock
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r} is invalid: allowed none, {', '.join(REMAT_POLICIES)}")
    # prevent_cse=False: the scan already keeps XLA from merging the recomputation away.
    return nn.remat(DecoderBlock, policy=REMAT_POLICIES[self.remat],
                    prevent_cse=not self.config.scan_layers)

  def _scan(self, block: type[nn.Module], x: jax.Array, caches: Optional[tuple[LayerCache, ...]],
            lengths, num_tokens, attn_impl: str, start: int):
    """Layers start .. L-1 as one nn.scan over stacked parameters ('layers'); caches, a tuple of
    per-layer caches, are stacked leaf by leaf for the scan and split again after it."""
    cfg = self.config
    count = cfg.num_layers - start
    stacked = None if caches is None else jax.tree_util.tree_map(lambda *c: jnp.stack(c), *caches)
    scan = nn.scan(block, variable_axes={"params": 0, "losses": 0, "absorbed": 0},
                   split_rngs={"params": True}, in_axes=(0, nn.broadcast, nn.broadcast), length=count)
    x, stacked = scan(cfg, start, attn_impl, name="layers")(x, stacked, lengths, num_tokens)
    if stacked is None:
      return x, [None] * count
    return x, [jax.tree_util.tree_map(lambda c, j=j: c[j], stacked) for j in range(count)]

  def _check_inputs(self, tokens: jax.Array, cache: Optional[Cache],
                    num_tokens: Optional[jax.Array]) -> None:
    """Shape checks always; value checks (token ids, cache room) when the arrays are concrete,
    since under jit a gather would clamp a bad id and a scatter would drop an overflow silently."""
    cfg = self.config
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be an integer array [B,T], got {tokens.dtype}{tokens.shape}")
    b, t = tokens.shape
    limit = cfg.max_seq_len if cache is None else cache.max_len
    if t > limit:
      raise ValueError(f"tokens has T={t} positions, more than the "
                       f"{'model.max_seq_len' if cache is None else 'cache max_len'} ({limit})")
    if num_tokens is not None and cache is None:
      raise ValueError("num_tokens is only meaningful with a cache (ragged prefill)")
    if cache is not None and cache.batch_size != b:
      raise ValueError(f"tokens batch {b} does not match the cache's batch {cache.batch_size}")
    if _is_concrete(tokens) and t:
      ids = np.asarray(tokens)
      if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"token ids must be in [0, vocab_size={cfg.vocab_size}), got "
                         f"[{ids.min()}, {ids.max()}]")
    if cache is not None and _is_concrete(cache.lengths) and (
        num_tokens is None or _is_concrete(num_tokens)):
      added = np.full((b,), t) if num_tokens is None else np.asarray(num_tokens)
      if added.min() < 0 or added.max() > t:
        raise ValueError(f"num_tokens must be in [0, T={t}], got {added.tolist()}")
      total = np.asarray(cache.lengths) + added
      if total.max() > cache.max_len:
        raise ValueError(f"cache overflow: lengths + new tokens = {total.tolist()} exceeds the "
                         f"cache's max_len {cache.max_len}")


def parameter_shapes(config: ModelConfig, remat: str = "none") -> dict[str, Any]:
  """The Transformer's parameter tree as jax.ShapeDtypeStruct leaves (jax.eval_shape of its init:
  nothing is allocated, so the largest presets are sized on a laptop)."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  model = Transformer(config, remat=remat)
  return jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)["params"]
