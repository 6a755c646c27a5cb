"""Parameter specs: one declaration of every weight, read by the Linen and the NNX modules alike.

A layer's parameters are a nested dict of ParamSpec (shape, logical axes, initializer, dtype),
named after Hugging Face's modules (q_a_proj, kv_b_proj, ...) with the input axes first, so
converting a checkpoint is a transpose and reshape per tensor. The math lives in pure functions
of (parameters, inputs, cache); a Linen module declares its specs with `declare` (each leaf a
`self.param` boxed with nn.with_logical_partitioning, nested dicts as child scopes of the same
names, so the parameter tree is the one the Linen hierarchy always had), and an NNX module makes
them with `mla_jax.nnx` (each leaf an nnx.Param whose `out_sharding` holds the logical axes).

Linen boxes only under flax's `nn.logical_axis_rules(...)` context, the flax route to logical
sharding (`nn.get_partition_spec` of an eval_shape'd init, then `nn.logical_to_mesh_sharding`).
Outside it `init` returns plain arrays as it always did: boxes would change every parameter
leaf a caller indexes, and nnx.bridge turns boxes into Variables that it then insists on
sharding at creation. mla_jax.shard places either kind of tree (boxes, or names by table).

The logical axes are names in mla_jax/sharding.py's RULES ("embed", "heads", ...), which map them
to mesh axes; a user's rules may map them elsewhere (sharding.shard's `rules`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta
from flax.core import spmd as flax_spmd

from mla_jax.config.model import ModelConfig

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One parameter: shape, one logical axis name (or None) per dimension, initializer, dtype."""

  shape: tuple[int, ...]
  axes: tuple[Optional[str], ...]
  init: Initializer
  dtype: str = "float32"

  def __post_init__(self):
    if len(self.axes) != len(self.shape):
      raise ValueError(f"ParamSpec axes {self.axes} do not match its shape {self.shape}")


ParamSpecs = dict[str, Union[ParamSpec, "ParamSpecs"]]


def projection(config: ModelConfig, shape: tuple[int, ...],
               axes: tuple[Optional[str], ...]) -> ParamSpec:
  """A projection weight: N(0, initializer_range) in param_dtype."""
  return ParamSpec(tuple(shape), tuple(axes), nn.initializers.normal(config.initializer_range),
                   str(jnp.dtype(config.param_dtype)))


def norm_specs(size: int, dtype: str = "float32") -> ParamSpecs:
  """An RMSNorm's one parameter, its scale [F], starting at ones like Hugging Face's."""
  return {"scale": ParamSpec((size,), ("norm",), nn.initializers.ones, str(jnp.dtype(dtype)))}


def stacked(specs: ParamSpecs, count: int) -> ParamSpecs:
  """Specs of `count` layers stacked on a new leading 'layers' axis (model.scan_layers), each
  layer initialised from its own key."""

  def stack(spec: ParamSpec) -> ParamSpec:
    def init(key, shape, dtype, base=spec.init):
      return jax.vmap(lambda k: base(k, shape[1:], dtype))(jax.random.split(key, shape[0]))
    return ParamSpec((count,) + spec.shape, ("layers",) + spec.axes, init, spec.dtype)

  return map_specs(stack, specs)


def map_specs(fn: Callable[[ParamSpec], Any], specs: ParamSpecs) -> dict:
  """The spec tree with fn applied to every ParamSpec."""
  return {name: fn(spec) if isinstance(spec, ParamSpec) else map_specs(fn, spec)
          for name, spec in specs.items()}


class _Declared(nn.Module):
  """A Linen scope that only declares the specs it is given and returns their values."""

  specs: Any

  @nn.compact
  def __call__(self) -> dict:
    return declare(self, self.specs)


def declare(module: nn.Module, specs: ParamSpecs) -> dict:
  """Declares `specs` as `module`'s parameters (Linen) and returns their values, unboxed.

  Leaves become self.param, boxed with their logical axes (nn.with_logical_partitioning, read
  by nn.get_partition_spec) when flax's logical_axis_rules context is set; a nested dict becomes
  a child scope of that name. Declared in the specs' order, so parameters initialise as the same
  module written by hand would.
  """
  boxed = bool(flax_spmd.get_logical_axis_rules())
  values = {}
  for name, spec in specs.items():
    if isinstance(spec, ParamSpec):
      init = nn.with_logical_partitioning(spec.init, spec.axes) if boxed else spec.init
      values[name] = module.param(name, init, spec.shape, jnp.dtype(spec.dtype))
    else:  # a nested dict (Linen keeps module attributes as FrozenDicts)
      values[name] = _Declared(spec, name=name)()
  return values


def cast(w: jax.Array, config: ModelConfig) -> jax.Array:
  """A stored weight in the compute dtype (model.dtype)."""
  return jnp.asarray(w).astype(jnp.dtype(config.dtype))


def unbox(tree: Any) -> Any:
  """A parameter tree with flax's logical-partitioning boxes (nn.Partitioned) replaced by their
  arrays; plain trees pass through. Every public function taking parameters accepts both."""
  return meta.unbox(tree)
