"""Device meshes and logical axes: the one place that decides where every array dimension lives.

Every parameter dimension has a logical name (PARAM_AXES, by parameter name) and every cache
dimension too (CACHE_AXES); RULES maps logical names to mesh axes. Parallelism is changed here and
in the `mesh:` config, never in the layers. Mesh axes:

  data      batch (data parallel; also the decode cache's batch)
  fsdp      batch too, and the model-width dimension of every weight and its optimizer moments
  tensor    attention heads, MLP width and vocabulary (tensor parallel)
  sequence  the decode cache's token axis: MLA's latent has no head axis for `tensor` to split,
            so long caches are split along their sequence instead (XLA then computes the softmax
            over S across those devices with collectives)

Meshes use AxisType.Auto: shardings are given at jit boundaries and on a few activations through
constrain(), and XLA propagates the rest; no jnp call in the model needs a sharding argument.

A user's own model. The library's layers annotate their parameters with these logical names
(Linen: nn.with_logical_partitioning boxes, read by nn.get_partition_spec; NNX: each nnx.Param's
out_sharding). `shard(tree, mesh, rules=...)` reads those annotations first, then the name
tables, and maps logical names with the user's rules laid over RULES: a dict or flax-style
sequence of (logical name, mesh axes or None) pairs, the first pair of a name winning, as in
flax's logical_axis_rules; rules set with `nn.logical_axis_rules(...)` apply too, and also to the
activations constrain() pins. A leaf with no annotation and no table entry, or a logical name
with no rule, is refused with the annotation or the rule to add.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Mapping, Optional, Sequence, Union

import sys

import jax
import numpy as np
from flax.core import meta
from flax.core import spmd as flax_spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

RULES: dict[str, Optional[tuple[str, ...]]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "kv_heads": None,  # baselines: MQA/GQA have too few to split; replicated
    "q_lora": None,
    "kv_lora": None,  # the latent width: small, read whole by every head
    "head_dim": None,
    "norm": None,
    "expert": ("tensor",),  # routed experts split over the tensor axis (expert parallel)
    "moe_mlp": None,  # an expert's own width: the tensor axis already holds its experts
    "cache_batch": ("data",),
    "cache_seq": ("sequence",),
    "layers": None,  # the stacked-layer axis of model.scan_layers: every device holds all layers
}

PARAM_AXES: dict[str, tuple[Optional[str], ...]] = {
    "embed_tokens": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "scale": ("norm",),  # every RMSNorm
    "q_proj": ("embed", "heads", "head_dim"),
    "q_a_proj": ("embed", "q_lora"),
    "q_b_proj": ("q_lora", "heads", "head_dim"),
    "kv_a_proj_with_mqa": ("embed", "kv_lora"),
    "kv_b_proj": ("kv_lora", "heads", "head_dim"),
    "w_uk": ("heads", "head_dim", "kv_lora"),  # absorbed_weights: kv_b_proj's halves, head-major
    "w_uv": ("heads", "kv_lora", "head_dim"),
    "o_proj": ("heads", "head_dim", "embed"),
    "k_proj": ("embed", "kv_heads", "head_dim"),
    "v_proj": ("embed", "kv_heads", "head_dim"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    "gate": ("embed", "expert"),  # the MoE router
    "e_score_correction_bias": ("expert",),
    "experts_gate_proj": ("expert", "embed", "moe_mlp"),
    "experts_up_proj": ("expert", "embed", "moe_mlp"),
    "experts_down_proj": ("expert", "moe_mlp", "embed"),
    "eh_proj": ("embed", None),  # an MTP module's [embedding; hidden] 2D -> D projection
}

CACHE_AXES: dict[str, tuple[Optional[str], ...]] = {
    "c_kv": ("cache_batch", "cache_seq", "kv_lora"),
    "k_rope": ("cache_batch", "cache_seq", "head_dim"),
    "c_kv_scale": ("cache_batch", "cache_seq", None),  # int8/int4 latents: one scale per token
    "k": ("cache_batch", "kv_heads", "cache_seq", "head_dim"),  # head-major K/V: [B,G,S,K]
    "v": ("cache_batch", "kv_heads", "cache_seq", "head_dim"),
    "lengths": ("cache_batch",),
}


_MESH_SIZE_RANGE = "a positive device count, or -1 for the remaining devices (one axis at most)"


def _check_mesh_axes(sizes: dict[str, int]) -> None:
  """Raises ValueError naming the axis for a name not in MESH_AXES, a missing axis, or a size
  that is not a positive integer or -1."""
  if not isinstance(sizes, Mapping):
    raise ValueError(f"mesh sizes must be a dict of {', '.join(MESH_AXES)} to device counts, got "
                     f"{type(sizes).__name__} {sizes!r:.40}")
  for axis, size in sizes.items():
    if axis not in MESH_AXES:
      close = difflib.get_close_matches(str(axis), MESH_AXES, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ValueError(f"mesh axis {axis!r} is unknown{hint}: allowed {', '.join(MESH_AXES)}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (
        size <= 0 and size != -1):
      raise ValueError(f"mesh.{axis}={size!r} is invalid: must be {_MESH_SIZE_RANGE}")
  missing = [axis for axis in MESH_AXES if axis not in sizes]
  if missing:
    raise ValueError(f"mesh sizes have no {', '.join(missing)}: give all of "
                     f"{', '.join(MESH_AXES)} (1 for an axis not split)")


def mesh_shape(sizes: dict[str, int], device_count: int) -> dict[str, int]:
  """Resolves one -1 ("the remaining devices") and checks the product is the device count.
  Raises ValueError naming the axis for an unknown or missing axis name (MESH_AXES), a size that
  is neither a positive integer nor -1, more than one -1, or a product other than device_count."""
  _check_mesh_axes(sizes)
  unknown = [axis for axis, size in sizes.items() if size == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh axes {unknown} are all -1: at most one axis may take the remainder")
  known = math.prod(size for size in sizes.values() if size != -1)
  resolved = dict(sizes)
  if unknown:
    if device_count % known:
      raise ValueError(f"mesh.{unknown[0]}=-1 cannot be resolved: the other axes multiply to "
                       f"{known}, which does not divide the {device_count} devices")
    resolved[unknown[0]] = device_count // known
  product = math.prod(resolved.values())
  if product != device_count:
    axes = " x ".join(f"{axis}={size}" for axis, size in resolved.items())
    raise ValueError(f"mesh {axes} has {product} devices, but {device_count} are available: the "
                     "product of mesh.data, mesh.fsdp, mesh.tensor and mesh.sequence must equal it")
  return resolved


def make_mesh(sizes: dict[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh over `devices` (default: all) with every axis of MESH_AXES sized by `sizes`, e.g.
  {"data": -1, "fsdp": 1, "tensor": 2, "sequence": 1}; ValueError as mesh_shape says."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices))
  return jax.make_mesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


MeshAxes = Optional[Union[str, tuple[str, ...]]]
Rules = Union[Mapping[str, MeshAxes], Sequence[tuple[str, MeshAxes]]]


def _rule_pairs(rules: Rules) -> list[tuple[str, MeshAxes]]:
  if isinstance(rules, Mapping):
    return list(rules.items())
  pairs = []
  for entry in rules:
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
      raise ValueError(f"sharding rule {entry!r} is invalid: each rule is a (logical name, mesh "
                       "axes) pair, e.g. ('mlp', 'tensor') or ('embed', None)")
    pairs.append((entry[0], entry[1]))
  return pairs


def resolve_rules(rules: Optional[Rules] = None) -> dict[str, Optional[tuple[str, ...]]]:
  """Logical name -> mesh axes: RULES, then flax's logical_axis_rules context, then `rules`
  (each later source overrides; within one sequence the first pair of a name wins, as flax
  reads its rules). Mesh axes are normalised to a tuple or None; they may be any mesh's axis
  names (the library's meshes use MESH_AXES), checked against the mesh where one is used.
  Raises ValueError for a rule that is not a (name, axes) pair of strings."""
  resolved: dict[str, Optional[tuple[str, ...]]] = dict(RULES)
  for source in (flax_spmd.get_logical_axis_rules() or (), rules or ()):
    seen = set()
    for name, axes in _rule_pairs(source):
      if name in seen:
        continue
      seen.add(name)
      normalised = None if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      if normalised is not None and not all(isinstance(a, str) and a for a in normalised):
        raise ValueError(f"sharding rule ({name!r}, {axes!r}) is invalid: the mesh axes are a "
                         "name, a tuple of names, or None to replicate")
      resolved[name] = normalised
  return resolved


def logical_to_spec(axes: Sequence[Optional[str]], rules: Optional[Rules] = None,
                    where: str = "") -> PartitionSpec:
  """Logical axes -> the PartitionSpec under resolve_rules(rules). Raises ValueError naming the
  rule to add for a logical name no rule maps."""
  return _spec(axes, resolve_rules(rules), where)


def _spec(axes: Sequence[Optional[str]], table: dict, where: str = "") -> PartitionSpec:
  """logical_to_spec with the rules already resolved (one table for a whole tree)."""
  for a in axes:
    if a is not None and a not in table:
      raise ValueError(f"logical axis {a!r}{' of ' + where if where else ''} has no sharding "
                       f"rule: pass rules with ({a!r}, <mesh axes>), e.g. ({a!r}, 'tensor') to "
                       f"split it or ({a!r}, None) to replicate it")
  return PartitionSpec(*(table[a] if a is not None else None for a in axes))


def _nnx_variable(x: Any) -> bool:
  """Whether x is an nnx.Variable; flax.nnx is only looked at once loaded (it imports optax,
  which the layers-only install does not need)."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(x, nnx.Variable)


def _is_annotated(x: Any) -> bool:
  """A flax box (nn.Partitioned) or an NNX Variable: a leaf that may carry logical axes."""
  return isinstance(x, meta.AxisMetadata) or _nnx_variable(x)


def _annotation(leaf: Any) -> Optional[tuple[Optional[str], ...]]:
  if isinstance(leaf, meta.Partitioned):
    return tuple(leaf.names)
  if _nnx_variable(leaf):
    names = leaf.get_metadata().get("out_sharding")
    return None if not names else tuple(names)
  return None


def _value(leaf: Any) -> Any:
  if isinstance(leaf, meta.AxisMetadata):
    return leaf.unbox()
  if _nnx_variable(leaf):
    return leaf.get_value()
  return leaf


def _dim_mesh_axes(path, leaf, table: dict, axes_table=None
                   ) -> list[tuple[Optional[str], tuple[str, ...]]]:
  """(logical axis, mesh axes it is split over) for each dimension of a leaf, under the resolved
  rules `table`."""
  axes = leaf_axes(path, leaf, axes_table)
  out = []
  for logical, entry in zip(axes, _spec(axes, table, jax.tree_util.keystr(path))):
    mesh_axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    out.append((logical, mesh_axes))
  return out


def _leaf_name(path) -> Optional[str]:
  """The last dict key or attribute name on a pytree path: the parameter or cache field name."""
  for key in reversed(path):
    name = getattr(key, "key", None) or getattr(key, "name", None)
    if isinstance(name, str):
      return name
  return None


def _under_stacked_layers(path) -> bool:
  return any(getattr(key, "key", None) == "layers" for key in path)


def leaf_axes(path, leaf, axes_table: Optional[Mapping[str, Sequence[Optional[str]]]] = None
              ) -> tuple[Optional[str], ...]:
  """Logical axes of a parameter, an optimizer moment mirroring one, or a cache array: the
  leaf's own annotation (a flax box's names, an nnx.Variable's out_sharding), else its name in
  axes_table (the caller's: leaf name -> axes), PARAM_AXES or CACHE_AXES.

  Scalars (step counters) are replicated. An array with none of these is an error naming the
  annotation to add, so no parameter can silently go unsharded.
  """
  annotated = _annotation(leaf)
  value = _value(leaf)
  if annotated is not None:
    if len(annotated) != np.ndim(value):
      raise ValueError(f"{jax.tree_util.keystr(path)} of shape {np.shape(value)} is annotated "
                       f"with {len(annotated)} logical axes {annotated}: one per dimension")
    return annotated
  leaf = value
  if np.ndim(leaf) == 0:
    return ()
  name = _leaf_name(path)
  axes = (axes_table or {}).get(name, PARAM_AXES.get(name, CACHE_AXES.get(name)))
  if axes is not None and _under_stacked_layers(path) and np.ndim(leaf) == len(axes) + 1:
    axes = ("layers",) + tuple(axes)  # model.scan_layers: [L, ...] under params['layers']
  if axes is not None and len(axes) != np.ndim(leaf) and name in (axes_table or {}):
    raise ValueError(f"axes[{name!r}] = {tuple(axes)} has {len(axes)} logical names, but "
                     f"{jax.tree_util.keystr(path)} has {np.ndim(leaf)} dimensions "
                     f"{np.shape(leaf)}: give one name (or None) per dimension")
  if axes is None or len(axes) != np.ndim(leaf):
    dims = ", ".join(["'...'"] * np.ndim(leaf)) + ("," if np.ndim(leaf) == 1 else "")
    raise ValueError(f"no logical axes for array {jax.tree_util.keystr(path)} of shape "
                     f"{np.shape(leaf)}: annotate it (Linen: nn.with_logical_partitioning(init, "
                     f"({dims})); NNX: nnx.Param(value, out_sharding=({dims}))) or pass "
                     f"axes={{{name!r}: ({dims})}}, one logical name (or None) per dimension")
  return tuple(axes)


def tree_shardings(tree: Any, mesh: Mesh, rules: Optional[Rules] = None,
                   axes: Optional[Mapping[str, Sequence[Optional[str]]]] = None) -> Any:
  """NamedShardings for every leaf (arrays, ShapeDtypeStructs, flax boxes or nnx Variables,
  each box getting one sharding), checking divisibility. rules: the caller's logical-name ->
  mesh-axes rules over RULES (resolve_rules); axes: leaf name -> logical axes for the caller's
  own unannotated leaves. Raises ValueError naming the leaf and the annotation, rule or mesh
  size to change."""
  resolved = resolve_rules(rules)  # validated once, before any leaf

  def sharding(path, leaf):
    shape = np.shape(_value(leaf))
    dims = _dim_mesh_axes(path, leaf, resolved, axes)
    for dim, (logical, mesh_axes) in enumerate(dims):
      missing = [a for a in mesh_axes if a not in mesh.shape]
      if missing:
        raise ValueError(f"sharding rule ({logical!r}, {mesh_axes}) for {jax.tree_util.keystr(path)}"
                         f" names mesh axis {missing[0]!r}, which this mesh lacks (its axes: "
                         f"{', '.join(mesh.axis_names)}): pass rules mapping {logical!r} to this "
                         "mesh's axes, or to None to replicate")
      ways = math.prod(mesh.shape[a] for a in mesh_axes)
      if shape[dim] % ways:
        named = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in mesh_axes)
        raise ValueError(f"{named} does not divide dimension {dim} ('{logical}', size "
                         f"{shape[dim]}) of {jax.tree_util.keystr(path)}")
    return NamedSharding(mesh, PartitionSpec(*(mesh_axes or None for _, mesh_axes in dims)))

  return jax.tree_util.tree_map_with_path(sharding, tree, is_leaf=_is_annotated)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Training batches [B,T]: B over data and fsdp."""
  return NamedSharding(mesh, logical_to_spec(("batch", None)))


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
  """Pins an activation's sharding by logical axes under a mesh (jax.set_mesh); a no-op without
  one, so the layers run unchanged on a single device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, _within(logical_to_spec(axes), mesh.axis_names))


def _within(spec: PartitionSpec, names: Sequence[str]) -> PartitionSpec:
  """spec with the mesh axes a mesh lacks left out (a user's mesh of other axis names: the
  activations those rules would pin are then left to XLA's propagation)."""
  def keep(entry):
    if entry is None:
      return None
    kept = tuple(a for a in ((entry,) if isinstance(entry, str) else entry) if a in names)
    return kept or None
  return PartitionSpec(*(keep(e) for e in spec))


def mesh_axes_of(logical: str) -> tuple[str, ...]:
  """The mesh axes of the current mesh a logical name is split over under the current rules
  (() if replicated, or without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  names = () if mesh.empty else mesh.axis_names
  return tuple(a for a in resolve_rules().get(logical) or () if a in names)


def sequence_split() -> Optional[dict[str, tuple[str, ...]]]:
  """Under a mesh that splits the cache's sequence axis ('cache_seq') over more than one device:
  the mesh axes of the cache's batch and sequence, for flash-decoding's split over S
  (layers/flash_decode.split_over_sequence); None otherwise."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  seq = mesh_axes_of("cache_seq")
  if math.prod(mesh.shape[a] for a in seq) == 1:
    return None
  return {"batch_axes": mesh_axes_of("cache_batch"), "seq_axes": seq}


def shard(tree: Any, mesh: Mesh, rules: Optional[Rules] = None,
          axes: Optional[Mapping[str, Sequence[Optional[str]]]] = None) -> Any:
  """Places a parameter, optimizer-state or cache tree on the mesh: each leaf by its logical
  axes (its annotation, else `axes`, else the library's tables) mapped by `rules` over RULES
  (see tree_shardings). The tree keeps its structure (boxes stay boxes, an nnx.State stays
  one: apply it with nnx.update(model, shard(nnx.state(model), mesh)))."""
  return jax.device_put(tree, tree_shardings(tree, mesh, rules, axes))


def sharded_cached_apply(model, mesh: Mesh, params: Any, cache: Any, attn_impl: str = "auto",
                         absorbed: Any = None, rules: Optional[Rules] = None):
  """`model.apply` with a cache, jitted for params and cache laid out on `mesh` by the tables:
  tokens [B,T] and logits follow the cache's batch sharding, the cache is donated and comes back
  with the sharding it went in with, so a decode loop keeps it in place step after step.
  absorbed: absorbed_weights(config, params) (laid out like kv_b_proj over heads); with it the
  returned function is run(params, token_ids, cache, absorbed), and the absorbed and flash paths
  read W_UK and W_UV without transposing them each call. rules: as for shard."""
  param_shardings = tree_shardings(params, mesh, rules)
  cache_shardings = tree_shardings(cache, mesh, rules)
  tokens = NamedSharding(mesh, logical_to_spec(("cache_batch", None), rules))
  logits = NamedSharding(mesh, logical_to_spec(("cache_batch", None, "vocab"), rules))
  if absorbed is None:
    apply = jax.jit(
        lambda p, t, c: model.apply({"params": p}, t, cache=c, attn_impl=attn_impl),
        in_shardings=(param_shardings, tokens, cache_shardings),
        out_shardings=(logits, cache_shardings), donate_argnums=(2,))
  else:
    apply = jax.jit(
        lambda p, t, c, a: model.apply({"params": p, "absorbed": a}, t, cache=c,
                                       attn_impl=attn_impl),
        in_shardings=(param_shardings, tokens, cache_shardings,
                      tree_shardings(absorbed, mesh, rules)),
        out_shardings=(logits, cache_shardings), donate_argnums=(2,))

  def run(params, token_ids, cache, *absorbed):  # [B,T] int32 -> (logits [B,T,V], cache)
    with jax.set_mesh(mesh):
      return apply(params, token_ids, cache, *absorbed)

  return run


def bytes_per_device(tree: Any, sizes: dict[str, int], rules: Optional[Rules] = None) -> int:
  """Bytes of a tree's arrays that one device holds when laid out by the tables on a mesh of
  these sizes; shapes only, so it sizes a 671B model on a laptop (uneven splits round up)."""
  total = 0
  table = resolve_rules(rules)
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_annotated)[0]:
    value = _value(leaf)
    shape = list(np.shape(value))
    for dim, (_, mesh_axes) in enumerate(_dim_mesh_axes(path, leaf, table)):
      shape[dim] = -(-shape[dim] // math.prod(sizes.get(a, 1) for a in mesh_axes))
    total += math.prod(shape) * np.dtype(value.dtype).itemsize
  return total
