"""Native Flax NNX modules: the same layers as the Linen ones, from the same functional core.

Each module makes its parameters from the layer's specs (mla_jax/layers/params.py) as nnx.Param
attributes of the same names, so `nnx.to_pure_dict(nnx.state(model, nnx.Param))` is the Linen
model's parameter tree, leaf for leaf (names, shapes, dtypes): a Linen checkpoint, `load_hf`,
`absorbed_weights`, the sharding rules and `generate` serve both. `__call__` hands those
parameters to the layer's pure function (mla_attention, transformer_forward, ...), so the
numbers are the Linen module's. The cache stays an explicit argument and return value.

  model = mla_jax.nnx.Transformer(config, rngs=nnx.Rngs(0))
  logits, cache = model(tokens, cache=cache)
  load_params(model, params)             # a Linen / checkpoint / load_hf tree into the model
  params = model_params(model)           # and back, as plain arrays

Each nnx.Param carries its logical axes as `out_sharding` metadata (nnx.get_partition_spec reads
them; mla_jax.shard maps them to a mesh). Initial values are drawn from `rngs` and are not the
Linen module's: load the same parameters into both to compare them.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.cache import Cache, LayerCache
from mla_jax.config.model import ModelConfig
from mla_jax.kinds import absorbed_weights, attention_kind
from mla_jax.layers.mla import mla_attention
from mla_jax.layers.mlp import swiglu, swiglu_specs
from mla_jax.layers.moe import deepseek_moe, moe_specs
from mla_jax.layers.norms import rms_norm, norm_specs
from mla_jax.layers.params import ParamSpec, ParamSpecs, unbox
from mla_jax.model import block_specs, decoder_block, transformer_forward, transformer_specs

__all__ = ["Absorbed", "DecoderBlock", "DeepSeekMoE", "Losses", "MultiHeadAttention",
           "MultiHeadLatentAttention", "RMSNorm", "SwiGLU", "Transformer", "load_params",
           "model_params"]


class Losses(nnx.Variable):
  """An auxiliary loss of the last forward pass: DeepSeekMoE's expert-balance loss (weighted by
  aux_loss_alpha, a float32 scalar), kept as `model.expert_balance` by the outermost module that
  computes it (a Transformer, or a DecoderBlock / DeepSeekMoE used alone). Each call overwrites
  it, so the model's state keeps one structure (nnx.jit compiles once, nothing piles up); read it
  after the call, inside the loss function: `loss = nll + model.expert_balance.get_value()`."""


def _with_losses(config: ModelConfig, track: bool) -> bool:
  return track and config.aux_loss_alpha > 0 and config.n_routed_experts is not None


def _zero_loss() -> Losses:
  return Losses(jnp.zeros((), jnp.float32))


class Absorbed(nnx.Variable):
  """MLA's absorbed weights W_UK [H,N,C] / W_UV [H,C,V] (the Linen "absorbed" collection), set
  by `Transformer.absorb()`; a copy, to be made again after the parameters change."""


def _param(spec: ParamSpec, rngs: nnx.Rngs) -> nnx.Param:
  value = spec.init(rngs.params(), spec.shape, jnp.dtype(spec.dtype))
  # The logical axes as metadata; placing arrays on a mesh is mla_jax.shard's job, so no
  # eager sharding here (it would need a mesh and the rules at construction time).
  return nnx.Param(value, out_sharding=spec.axes, eager_sharding=False)


class _Params(nnx.Module):
  """A plain container of parameters built from a spec tree (a nested dict of the specs)."""

  def __init__(self, specs: ParamSpecs, rngs: nnx.Rngs):
    _build(self, specs, rngs)


def _build(module: nnx.Module, specs: ParamSpecs, rngs: nnx.Rngs,
           children: Optional[dict] = None) -> None:
  """Sets one attribute per spec name: an nnx.Param for a leaf, the given child module (a
  callable making it) or else a _Params container for a nested dict."""
  children = children or {}
  for name, spec in specs.items():
    if name in children:
      setattr(module, name, children[name]())
    elif isinstance(spec, ParamSpec):
      setattr(module, name, _param(spec, rngs))
    else:
      setattr(module, name, _Params(spec, rngs))


def model_params(module: nnx.Module) -> dict:
  """The module's parameters as the Linen tree of plain arrays (what a checkpoint holds)."""
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def load_params(module: nnx.Module, params: dict) -> None:
  """Replaces the module's parameters by `params`, a Linen-layout tree (from a Linen model's
  init, a checkpoint, load_hf; flax boxes are unboxed). The tree must match the module's
  exactly: raises ValueError naming the first path that is missing, extra or of another shape."""
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)
  if hasattr(params, "keys") and set(params) == {"params"}:
    raise ValueError("load_params got a variables dict {'params': ...}: pass the parameter tree "
                     "itself (variables['params'])")
  params = unbox(params)
  state = nnx.state(module, nnx.Param)
  want = nnx.to_pure_dict(state)
  _check_same_tree(want, params, "params")
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(
      lambda old, new: jnp.asarray(new, dtype=old.dtype), want, params))
  nnx.update(module, state)


def _check_same_tree(want, got, path: str) -> None:
  if isinstance(want, dict):
    if not hasattr(got, "keys"):
      raise ValueError(f"{path} is a {type(got).__name__}, expected a dict with keys "
                       f"{sorted(want)}")
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
      raise ValueError(f"{path}: missing {missing}, unexpected {extra}: the tree is not this "
                       "model's (same config? same scan_layers layout?)")
    for name in want:
      _check_same_tree(want[name], got[name], f"{path}/{name}")
  elif tuple(jnp.shape(got)) != tuple(want.shape):
    raise ValueError(f"{path} has shape {tuple(jnp.shape(got))}, this model's is "
                     f"{tuple(want.shape)}")


class RMSNorm(nnx.Module):
  """x [..., F] -> [..., F]: x / rms(x) * scale, in float32, cast to dtype."""

  def __init__(self, size: int, eps: float = 1e-6, dtype=jnp.float32, param_dtype="float32", *,
               rngs: nnx.Rngs):
    self.eps, self.dtype = eps, dtype
    _build(self, norm_specs(size, param_dtype), rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(model_params(self), x, self.eps, self.dtype)


class SwiGLU(nnx.Module):
  """x [B,T,D] -> [B,T,D]: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: ModelConfig, intermediate_size: Optional[int] = None, *,
               rngs: nnx.Rngs):
    self.config = config
    _build(self, swiglu_specs(config, intermediate_size), rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return swiglu(self.config, model_params(self), x)


class DeepSeekMoE(nnx.Module):
  """x [B,T,D] -> [B,T,D]; with aux_loss_alpha > 0 the call's expert-balance loss is kept in
  self.expert_balance (Losses) unless track_losses=False (a module inside one that keeps it)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, track_losses: bool = True):
    self.config = config
    size = config.moe_intermediate_size * config.n_shared_experts
    _build(self, moe_specs(config), rngs,
           {"shared_experts": lambda: SwiGLU(config, size, rngs=rngs)})
    if _with_losses(config, track_losses):
      self.expert_balance = _zero_loss()

  def __call__(self, x: jax.Array) -> jax.Array:
    out, aux = deepseek_moe(self.config, model_params(self), x)
    if hasattr(self, "expert_balance"):
      self.expert_balance.set_value(aux)
    return out


class _Attention(nnx.Module):
  """The attention kind's pure function over this module's parameters; see the subclasses."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, record_intermediates: bool = False):
    self.config = config
    self.record_intermediates = record_intermediates
    norms = {name: (lambda size=size: RMSNorm(size, config.latent_norm_eps, config.dtype,
                                              config.param_dtype, rngs=rngs))
             for name, size in (("q_a_layernorm", config.q_lora_rank),
                                ("kv_a_layernorm", config.kv_lora_rank))}
    _build(self, attention_kind(config).param_specs(config), rngs, norms)

  def __call__(self, x: jax.Array, *, cache: Optional[LayerCache] = None,
               lengths: Optional[jax.Array] = None, num_tokens: Optional[jax.Array] = None,
               attn_impl: str = "auto") -> tuple[jax.Array, Optional[LayerCache]]:
    absorbed = nnx.to_pure_dict(nnx.state(self, Absorbed)) or None
    record = (lambda name, value: self.sow(nnx.Intermediate, name, value)) \
        if self.record_intermediates else (lambda name, value: None)
    return attention_kind(self.config).apply(
        self.config, model_params(self), x, cache=cache, lengths=lengths,
        num_tokens=num_tokens, attn_impl=attn_impl, absorbed=absorbed, record=record)


class MultiHeadLatentAttention(_Attention):
  """MLA, x [B,T,D] -> (y [B,T,D], updated LatentCache or None), as the Linen
  mla_jax.MultiHeadLatentAttention: the same arguments, parameters and numbers
  (mla_jax/layers/mla.py). record_intermediates=True sows q_lat, probs, ... as
  nnx.Intermediate, read with nnx.capture(layer, nnx.Intermediate)(x) (off by default)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, record_intermediates: bool = False):
    if config.attention != "mla":
      raise ValueError(f"MultiHeadLatentAttention needs model.attention='mla', got "
                       f"{config.attention!r}: use MultiHeadAttention for the baselines")
    super().__init__(config, rngs=rngs, record_intermediates=record_intermediates)


class MultiHeadAttention(_Attention):
  """The MHA/GQA/MQA baseline (model.attention), as the Linen one (mla_jax/layers/attention.py)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    if config.attention == "mla":
      raise ValueError("MultiHeadAttention is the baseline: model.attention is 'mla', use "
                       "MultiHeadLatentAttention")
    super().__init__(config, rngs=rngs)


def _attention(config: ModelConfig, rngs: nnx.Rngs) -> _Attention:
  cls = MultiHeadLatentAttention if config.attention == "mla" else MultiHeadAttention
  return cls(config, rngs=rngs)


class DecoderBlock(nnx.Module):
  """One pre-norm block: (x [B,T,D], cache, lengths, num_tokens) -> (x, cache), as
  mla_jax.model.decoder_block; a DeepSeekMoE block keeps its expert-balance loss as
  self.expert_balance (Losses) unless track_losses=False."""

  def __init__(self, config: ModelConfig, layer: int = 0, *, rngs: nnx.Rngs,
               track_losses: bool = True):
    self.config, self.layer = config, layer
    d, eps = config.hidden_size, config.rms_norm_eps

    def norm():
      return RMSNorm(d, eps, config.dtype, config.param_dtype, rngs=rngs)

    mlp = (lambda: DeepSeekMoE(config, rngs=rngs, track_losses=False)) if config.is_moe_layer(
        layer) else (lambda: SwiGLU(config, rngs=rngs))
    _build(self, block_specs(config, layer), rngs,
           {"input_layernorm": norm, "self_attn": lambda: _attention(config, rngs),
            "post_attention_layernorm": norm, "mlp": mlp})
    if _with_losses(config, track_losses) and config.is_moe_layer(layer):
      self.expert_balance = _zero_loss()

  def __call__(self, x: jax.Array, cache: Optional[LayerCache] = None,
               lengths: Optional[jax.Array] = None, num_tokens: Optional[jax.Array] = None,
               attn_impl: str = "auto") -> tuple[jax.Array, Optional[LayerCache]]:
    absorbed = nnx.to_pure_dict(nnx.state(self.self_attn, Absorbed)) or None
    x, cache, aux = decoder_block(self.config, self.layer, model_params(self), x, cache,
                                  lengths, num_tokens, attn_impl, absorbed)
    if hasattr(self, "expert_balance"):
      self.expert_balance.set_value(aux)
    return x, cache


class Transformer(nnx.Module):
  """The decoder-only LM: `logits, cache = model(tokens, cache=None, attn_impl='auto',
  num_tokens=None)`, tokens [B,T] int -> logits [B,T,V] float32, as mla_jax.Transformer
  (mla_jax/model.py): the same parameter tree, arguments, errors and numbers.

  Attributes embed_tokens, layers_0 .. layers_{L-1} (DecoderBlock modules; with
  model.scan_layers the repeated blocks' parameters stacked under `layers`), norm, lm_head.
  With DeepSeekMoE's aux loss, the call's summed expert-balance loss is kept in
  self.expert_balance (Losses).
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, remat: str = "none"):
    self.config, self.remat = config, remat
    children = {f"layers_{i}": (lambda i=i: DecoderBlock(config, i, rngs=rngs,
                                                         track_losses=False))
                for i in range(config.num_layers)}
    children["norm"] = lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype,
                                       config.param_dtype, rngs=rngs)
    _build(self, transformer_specs(config), rngs, children)
    if _with_losses(config, True):
      self.expert_balance = _zero_loss()

  def __call__(self, tokens: jax.Array, cache: Optional[Cache] = None, attn_impl: str = "auto",
               num_tokens: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[Cache]]:
    absorbed = nnx.to_pure_dict(nnx.state(self, Absorbed)) or None
    logits, cache, aux = transformer_forward(
        self.config, model_params(self), tokens, cache, attn_impl=attn_impl,
        num_tokens=num_tokens, remat=self.remat, absorbed=absorbed)
    if hasattr(self, "expert_balance"):
      self.expert_balance.set_value(aux)
    return logits, cache

  def absorb(self) -> None:
    """Makes the absorbed weights (absorbed_weights) from the current parameters and keeps them
    as Absorbed variables, so the absorbed and flash paths read W_UK / W_UV as they lie; call
    again after the parameters change."""
    absorbed = absorbed_weights(self.config, model_params(self))

    def attach(module: nnx.Module, tree: dict) -> None:
      for name, value in tree.items():
        if isinstance(value, dict):
          attach(getattr(module, name), value)
        else:
          setattr(module, name, Absorbed(value))

    attach(self, absorbed)
