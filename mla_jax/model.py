"""Decoder-only Transformer LM: tokens [B,T] (+ cache) -> logits [B,T,V] (+ cache).

Pre-norm blocks of attention (MLA or a baseline) and a SwiGLU MLP or DeepSeekMoE, a final
RMSNorm and an untied LM head, as in DeepSeek-V2/V3. Used functionally: the cache is an argument
and a return value, never hidden module state, so one jitted function serves prefill and decode.

One functional core: transformer_forward is the whole model as a pure function of (parameters,
tokens, cache), built from the layers' pure functions; transformer_specs declares every
parameter once. The Linen Transformer here and the NNX one (mla_jax.nnx) both declare those
specs and call that function, so their parameter trees are the same and so are their numbers.

Layer loop. Unrolled (default): parameters `layers_0` .. `layers_{L-1}`, one block each in the
program. With model.scan_layers, the repeated blocks (all layers, or those after the
first_k_dense_replace dense ones of a DeepSeekMoE model, which stay unrolled as `layers_{i}`) have
their parameters stacked on a leading `layers` axis under the one name `layers`, and run as one
jax.lax.scan: the program holds one block whatever the depth. stack_layers / unstack_layers convert
parameters (and optimizer moments, any tree of the same layout) between the two.

The cache stays a tuple of per-layer caches in both layouts. Under scan its per-layer arrays
are stacked on entry and split on exit (tree_map, whatever the per-layer cache's fields):
measured, that copies the cache a few times per call, where the unrolled loop updates it in
place, so decoding is best done with the unrolled layout (docs/moe.md, "Scan over layers").

Multi-token prediction. With model.num_mtp_layers = D, DeepSeek-V3's D MTP modules follow the
layers as `mtp_layers_0` .. `mtp_layers_{D-1}` (mtp_layer_specs; their math is mla_jax/mtp.py).
They share embed_tokens and lm_head with the model and stay unrolled under scan_layers; the
forward pass here computes the next-token logits only, and transformer_hidden gives the final
hidden states the MTP modules start from.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mla_jax.cache import Cache, LayerCache
from mla_jax.config.model import ModelConfig
from mla_jax.kinds import attention_kind
from mla_jax.layers.mlp import swiglu, swiglu_specs
from mla_jax.layers.moe import deepseek_moe, moe_specs
from mla_jax.layers.norms import rms_norm
from mla_jax.layers.params import (ParamSpecs, declare, map_specs, norm_specs, projection,
                                   stacked, unbox)
from mla_jax.layers.precision import einsum_f32
from mla_jax.paged_cache import PagedCache
from mla_jax.sharding import constrain


REMAT_POLICIES = {  # train.remat -> jax.checkpoint policy (None: save nothing but block inputs)
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _is_concrete(x: jax.Array) -> bool:
  return not isinstance(x, jax.core.Tracer)


def first_scanned_layer(config: ModelConfig) -> int:
  """Index of the first layer of the scanned group: the dense first_k_dense_replace layers of a
  DeepSeekMoE model differ in structure and stay unrolled."""
  return config.first_k_dense_replace if config.n_routed_experts is not None else 0


def stack_layers(config: ModelConfig, params: dict[str, Any]) -> dict[str, Any]:
  """Unrolled parameters {'layers_i': ...} -> the scan layout: `layers_i` kept below
  first_scanned_layer, the rest stacked on a new leading axis under 'layers'. Other keys pass
  through; flax boxes are unboxed. Raises ValueError when a layer is missing or the tree is
  already stacked."""
  params = unbox(params)
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
  params = unbox(params)
  if "layers" not in params:
    raise ValueError("unstack_layers needs the scan layout: no 'layers' entry in the tree")
  start = first_scanned_layer(config)
  out = {k: v for k, v in params.items() if k != "layers"}
  for j in range(config.num_layers - start):
    out[f"layers_{start + j}"] = jax.tree_util.tree_map(lambda x, j=j: x[j], params["layers"])
  return out


def block_specs(config: ModelConfig, layer: int = 0) -> ParamSpecs:
  """One decoder block's parameters: input_layernorm, self_attn (the attention kind's),
  post_attention_layernorm and mlp (DeepSeekMoE from first_k_dense_replace on, else SwiGLU)."""
  d, dtype = config.hidden_size, config.param_dtype
  return {"input_layernorm": norm_specs(d, dtype),
          "self_attn": attention_kind(config).param_specs(config),
          "post_attention_layernorm": norm_specs(d, dtype),
          "mlp": moe_specs(config) if config.is_moe_layer(layer) else swiglu_specs(config)}


def mtp_layer_specs(config: ModelConfig, depth: int) -> ParamSpecs:
  """MTP module `depth` (0-based), named as DeepSeek-V3's checkpoints name its tensors: enorm
  and hnorm (the RMSNorms of the token embedding and of the previous depth's hidden state),
  eh_proj [2D,D] (their concatenation, embedding first, projected back to D), the Transformer
  block's own input_layernorm, self_attn, post_attention_layernorm and mlp (DeepSeekMoE when
  layer num_layers + depth would be an MoE layer), and shared_head.norm. The embedding and the
  output head are the model's own (embed_tokens, lm_head)."""
  d, dtype = config.hidden_size, config.param_dtype
  return {"enorm": norm_specs(d, dtype), "hnorm": norm_specs(d, dtype),
          "eh_proj": projection(config, (2 * d, d), ("embed", None)),
          **block_specs(config, config.num_layers + depth),
          "shared_head": {"norm": norm_specs(d, dtype)}}


def transformer_specs(config: ModelConfig) -> ParamSpecs:
  """The whole model's parameters: embed_tokens [V,D], layers_0 .. layers_{L-1} (or, with
  model.scan_layers, the repeated blocks stacked under 'layers' [L',...]), norm, lm_head [D,V],
  and with model.num_mtp_layers = D the MTP modules mtp_layers_0 .. mtp_layers_{D-1}."""
  cfg = config
  specs: ParamSpecs = {"embed_tokens": projection(cfg, (cfg.vocab_size, cfg.hidden_size),
                                                  ("vocab", "embed"))}
  scan_from = first_scanned_layer(cfg) if cfg.scan_layers else cfg.num_layers
  for i in range(scan_from):
    specs[f"layers_{i}"] = block_specs(cfg, i)
  if scan_from < cfg.num_layers:
    specs["layers"] = stacked(block_specs(cfg, scan_from), cfg.num_layers - scan_from)
  specs["norm"] = norm_specs(cfg.hidden_size, cfg.param_dtype)
  specs["lm_head"] = projection(cfg, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))
  for depth in range(cfg.num_mtp_layers):
    specs[f"mtp_layers_{depth}"] = mtp_layer_specs(cfg, depth)
  return specs


def decoder_block(config: ModelConfig, layer: int, params: dict, x: jax.Array,
                  cache: Optional[LayerCache], lengths: Optional[jax.Array],
                  num_tokens: Optional[jax.Array], attn_impl: str = "auto",
                  absorbed: Optional[dict] = None
                  ) -> tuple[jax.Array, Optional[LayerCache], jax.Array]:
  """One pre-norm block, pure: x [B,T,D] -> (x [B,T,D], this layer's updated cache or None,
  its expert-balance loss (float32 scalar, 0 for a dense layer)). params: block_specs' tree;
  absorbed: this layer's self_attn absorbed weights or None."""
  cfg = config
  dtype = jnp.dtype(cfg.dtype)
  normed = rms_norm(params["input_layernorm"], x, cfg.rms_norm_eps, dtype)
  attn_out, cache = attention_kind(cfg).apply(
      cfg, params["self_attn"], normed, cache=cache, lengths=lengths, num_tokens=num_tokens,
      attn_impl=attn_impl, absorbed=absorbed)
  x = x + attn_out
  normed = rms_norm(params["post_attention_layernorm"], x, cfg.rms_norm_eps, dtype)
  if cfg.is_moe_layer(layer):
    out, aux = deepseek_moe(cfg, params["mlp"], normed)
  else:
    out, aux = swiglu(cfg, params["mlp"], normed), jnp.zeros((), jnp.float32)
  return x + out, cache, aux


def remat_block(block: Callable, config: ModelConfig, remat: str) -> Callable:
  """The block under jax.checkpoint with train.remat's policy ('none': as it is)."""
  if remat == "none":
    return block
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r} is invalid: allowed none, {', '.join(REMAT_POLICIES)}")
  # prevent_cse=False under scan: the scan already keeps XLA from merging the recomputation away.
  return jax.checkpoint(block, policy=REMAT_POLICIES[remat], prevent_cse=not config.scan_layers)


def transformer_forward(config: ModelConfig, params: dict, tokens: jax.Array,
                        cache: Optional[Cache] = None, *, attn_impl: str = "auto",
                        num_tokens: Optional[jax.Array] = None, remat: str = "none",
                        absorbed: Optional[dict] = None
                        ) -> tuple[jax.Array, Optional[Cache], jax.Array]:
  """The Transformer, pure: tokens [B,T] int -> (logits [B,T,V] float32, the updated Cache or
  None, the summed expert-balance loss (float32 scalar; 0 without DeepSeekMoE's aux loss)).

  params: the tree of transformer_specs (arrays; flax boxes are unboxed). Without a cache, a
  causal forward; with one, the tokens go after each sequence's cached length and num_tokens [B]
  (optional) says how many of each row's T tokens are real. The cache is a contiguous Cache
  (init_cache) or a PagedCache (mla_jax.paged_cache: page pools and a page table), and comes
  back of the same type. absorbed: absorbed_weights(config,
  params), or None. Raises ValueError on tokens that are not [B,T] integers, ids outside the
  vocabulary, more tokens than max_seq_len or the cache holds, and an unknown remat policy.
  """
  check_inputs(config, tokens, cache, num_tokens)
  return _forward(config, unbox(params), tokens, cache, attn_impl, num_tokens, remat, absorbed)


def transformer_hidden(config: ModelConfig, params: dict, tokens: jax.Array,
                       cache: Optional[Cache] = None, *, attn_impl: str = "auto",
                       num_tokens: Optional[jax.Array] = None, remat: str = "none",
                       absorbed: Optional[dict] = None
                       ) -> tuple[jax.Array, Optional[Cache], jax.Array]:
  """transformer_forward without the output head: (the final hidden states [B,T,D] in
  model.dtype, after the final norm: what lm_head reads and what the first MTP module starts
  from; the updated Cache or None; the expert-balance loss). output_logits(config, params,
  hidden) gives the logits. Same arguments and errors as transformer_forward."""
  check_inputs(config, tokens, cache, num_tokens)
  return _hidden(config, unbox(params), tokens, cache, attn_impl, num_tokens, remat, absorbed)


def output_logits(config: ModelConfig, params: dict, hidden: jax.Array,
                  decoding: bool = False) -> jax.Array:
  """lm_head over hidden states [B,T,D] -> logits [B,T,V] float32 ("BTD,DV->BTV"), batch laid
  out as the training batch, or as the decode cache's batch with decoding=True."""
  batch_axis = "cache_batch" if decoding else "batch"
  return constrain(einsum_f32("BTD,DV->BTV", hidden, params["lm_head"].astype(hidden.dtype)),
                   (batch_axis, None, "vocab"))


def _forward(cfg: ModelConfig, params: dict, tokens: jax.Array, cache: Optional[Cache],
             attn_impl: str, num_tokens: Optional[jax.Array], remat: str,
             absorbed: Optional[dict]) -> tuple[jax.Array, Optional[Cache], jax.Array]:
  """transformer_forward after its input checks, on plain arrays."""
  x, cache, aux = _hidden(cfg, params, tokens, cache, attn_impl, num_tokens, remat, absorbed)
  return output_logits(cfg, params, x, decoding=cache is not None), cache, aux


def _hidden(cfg: ModelConfig, params: dict, tokens: jax.Array, cache: Optional[Cache],
            attn_impl: str, num_tokens: Optional[jax.Array], remat: str,
            absorbed: Optional[dict]) -> tuple[jax.Array, Optional[Cache], jax.Array]:
  """transformer_hidden after its input checks, on plain arrays."""
  b, t = tokens.shape
  if cache is not None and num_tokens is None:
    num_tokens = jnp.full((b,), t, jnp.int32)
  lengths = None if cache is None else cache.lengths
  paged = isinstance(cache, PagedCache)
  layer_caches = None if cache is None else (cache.with_tables() if paged else cache.layers)
  absorbed = absorbed or {}

  def run(layer: int) -> Callable:  # (params, x, cache, absorbed) -> (x, cache, aux)
    def block(p, x, c, a):
      return decoder_block(cfg, layer, p, x, c, lengths, num_tokens, attn_impl, a)
    return remat_block(block, cfg, remat)

  def attn_absorbed(name: str) -> Optional[dict]:
    return absorbed.get(name, {}).get("self_attn")

  x = jnp.take(params["embed_tokens"], tokens, axis=0).astype(jnp.dtype(cfg.dtype))  # [B,T,D]
  scan_from = first_scanned_layer(cfg) if cfg.scan_layers else cfg.num_layers
  new_layers, aux = [], jnp.zeros((), jnp.float32)
  for i in range(scan_from):
    x, layer_cache, layer_aux = run(i)(params[f"layers_{i}"], x,
                                       None if cache is None else layer_caches[i],
                                       attn_absorbed(f"layers_{i}"))
    new_layers.append(layer_cache)
    aux = aux + layer_aux
  if scan_from < cfg.num_layers:
    block = run(scan_from)
    caches = None if cache is None else layer_caches[scan_from:]
    stacked_cache = None if caches is None else jax.tree_util.tree_map(
        lambda *c: jnp.stack(c), *caches)  # per-layer caches stacked leaf by leaf for the scan

    def body(x, inputs):
      p, c, a = inputs
      x, c, layer_aux = block(p, x, c, a)
      return x, (c, layer_aux)

    x, (stacked_cache, scanned_aux) = jax.lax.scan(
        body, x, (params["layers"], stacked_cache, attn_absorbed("layers")))
    aux = aux + jnp.sum(scanned_aux)
    count = cfg.num_layers - scan_from
    new_layers += ([None] * count if stacked_cache is None else
                   [jax.tree_util.tree_map(lambda c, j=j: c[j], stacked_cache)
                    for j in range(count)])
  x = rms_norm(params["norm"], x, cfg.rms_norm_eps, jnp.dtype(cfg.dtype))
  if cache is None:
    return x, None, aux
  if paged:
    return x, cache.updated(new_layers, num_tokens), aux
  return x, Cache(layers=tuple(new_layers), lengths=cache.lengths + num_tokens), aux


class DecoderBlock(nn.Module):
  """decoder_block as a Linen module: (x [B,T,D], cache, lengths, num_tokens) -> (x, cache);
  sows the expert-balance loss into 'losses' when DeepSeekMoE has one."""

  config: ModelConfig
  layer: int = 0  # decides dense MLP or DeepSeekMoE (first_k_dense_replace)
  attn_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, cache: Optional[LayerCache], lengths: Optional[jax.Array],
               num_tokens: Optional[jax.Array]) -> tuple[jax.Array, Optional[LayerCache]]:
    params = declare(self, block_specs(self.config, self.layer))
    x, cache, aux = decoder_block(self.config, self.layer, params, x, cache, lengths,
                                  num_tokens, self.attn_impl)
    if self.config.aux_loss_alpha > 0 and self.config.is_moe_layer(self.layer):
      self.sow("losses", "expert_balance", aux)
    return x, cache


class Transformer(nn.Module):
  """`logits, cache = model.apply({'params': p}, tokens, cache=None, attn_impl='auto')`:
  transformer_forward as a Linen module.

  Without a cache: a causal forward over tokens [B,T]; returns (logits [B,T,V] float32, None).
  With a cache: the tokens go after each sequence's cached length, positions come from the cache,
  and the returned cache holds them. num_tokens [B] (optional, with a cache) says how many of each
  row's T tokens are real, for prompts of different lengths padded on the right. Under flax's
  nn.logical_axis_rules the parameters are boxed with their logical axes (layers/params.py); with DeepSeekMoE's aux loss the summed
  expert-balance loss is sown into 'losses' (apply with mutable=['losses']).
  """

  config: ModelConfig
  remat: str = "none"  # train.remat: none | full | dots_saveable | ... (REMAT_POLICIES)

  @nn.compact
  def __call__(self, tokens: jax.Array, cache: Optional[Cache] = None, attn_impl: str = "auto",
               num_tokens: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[Cache]]:
    check_inputs(self.config, tokens, cache, num_tokens)  # before declaring (init) anything
    params = declare(self, transformer_specs(self.config))
    logits, cache, aux = _forward(self.config, params, tokens, cache, attn_impl, num_tokens,
                                  self.remat, self.variables.get("absorbed"))
    if self.config.aux_loss_alpha > 0 and self.config.n_routed_experts is not None:
      self.sow("losses", "expert_balance", aux)
    return logits, cache


def check_inputs(config: ModelConfig, tokens: jax.Array, cache: Optional[Cache],
                 num_tokens: Optional[jax.Array]) -> None:
  """Shape checks always; value checks (token ids, cache room) when the arrays are concrete,
  since under jit a gather would clamp a bad id and a scatter would drop an overflow silently.
  Raises ValueError naming the argument and the allowed range."""
  cfg = config
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
  """The Transformer's parameter tree as jax.ShapeDtypeStruct leaves, from its specs: nothing
  is allocated or traced, so the largest presets are sized on a laptop. (remat does not change
  the parameters; accepted for the callers that pass it.)"""
  del remat
  return map_specs(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype)),
                   transformer_specs(config))


def logical_axes(config: ModelConfig) -> dict[str, Any]:
  """The Transformer's parameter tree with each leaf's logical axes (a tuple of names in
  sharding.RULES), the same annotations nn.get_partition_spec reads off its boxes."""
  return map_specs(lambda s: s.axes, transformer_specs(config))
