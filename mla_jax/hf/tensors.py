"""Hugging Face DeepseekV2/V3 tensor names <-> mla-jax parameters.

Every tensor name is mapped explicitly (no pattern guessing), and a missing, unexpected or
mis-shaped tensor is an error naming it. Hugging Face's nn.Linear stores [out, in]; mla-jax
stores input axes first with heads split out, so each mapping is a transpose and a reshape.
Both expert layouts load: DeepSeek's released per-expert tensors and transformers' fused ones.

DeepSeek-V3/R1 checkpoints also hold `num_nextn_predict_layers` multi-token-prediction (MTP)
layers after the last decoder layer: `model.layers.{num_hidden_layers + k}.*` is MTP module k
(model.num_mtp_layers; params mtp_layers_{k}), a decoder layer's tensors plus MTP_TENSORS, and
copies of the model's embedding and output head (MTP_SHARED), which the modules share with the
model (mla_jax/mtp.py): those copies map to embed_tokens and lm_head themselves. All of them are
entries of tensor_map, the one table both loading and its inverse read. Any other tensor the
model does not have is an error.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional

import numpy as np

from mla_jax.config.model import ModelConfig


class Conversion:
  """One HF tensor -> one parameter (__call__), and back: put(out, param) writes the parameter
  into its part of the HF tensor `out`, so export is the exact inverse of loading."""

  def __call__(self, w: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  def put(self, out: np.ndarray, param: np.ndarray) -> None:
    raise NotImplementedError


Target = tuple[tuple[str, ...], Conversion]  # (param path, how to get it from the HF tensor)


class _Linear(Conversion):
  """[out, in] -> [in, *out split]: transpose, then split an axis into e.g. (H, K) or (H, V)
  (a bias [out] is only split)."""

  def __init__(self, shape_in_first: tuple[int, ...]):
    self.shape = tuple(shape_in_first)

  def __call__(self, w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T).reshape(self.shape)

  def put(self, out: np.ndarray, param: np.ndarray) -> None:
    out[...] = np.asarray(param).reshape(out.shape[::-1]).T


class _Same(Conversion):
  def __call__(self, w: np.ndarray) -> np.ndarray:
    return w

  def put(self, out: np.ndarray, param: np.ndarray) -> None:
    out[...] = param


class _ExpertsHalf(Conversion):
  """Fused gate_up_proj [E, 2I, D] -> its gate (half 0) or up (half 1) part as [E, D, I]."""

  def __init__(self, half: int, size: int):
    self.part = slice(half * size, (half + 1) * size)

  def __call__(self, w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w[:, self.part].transpose(0, 2, 1))

  def put(self, out: np.ndarray, param: np.ndarray) -> None:
    out[:, self.part] = np.asarray(param).transpose(0, 2, 1)


class _ExpertsTranspose(Conversion):  # down_proj [E, D, I] <-> [E, I, D]
  def __call__(self, w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.transpose(0, 2, 1))

  def put(self, out: np.ndarray, param: np.ndarray) -> None:
    out[...] = np.asarray(param).transpose(0, 2, 1)


_linear, _same, _experts_half, _experts_transpose = (_Linear, _Same(), _ExpertsHalf,
                                                     _ExpertsTranspose())


def _mlp_entries(c: ModelConfig, layer: int, ours: str, width: int, prefix: str
                 ) -> dict[str, tuple[tuple[int, ...], list[Target]]]:
  d = c.hidden_size
  return {
      f"{prefix}gate_proj.weight": ((width, d), [((ours, "gate_proj"), _linear((d, width)))]),
      f"{prefix}up_proj.weight": ((width, d), [((ours, "up_proj"), _linear((d, width)))]),
      f"{prefix}down_proj.weight": ((d, width), [((ours, "down_proj"), _linear((width, d)))]),
  }


def _one(path: tuple[str, ...], shape: tuple[int, ...], convert: Conversion
         ) -> tuple[tuple[int, ...], list[Target]]:
  return shape, [(path, convert)]


def _layer_entries(c: ModelConfig, layer: int, ours: Optional[str] = None
                   ) -> dict[str, tuple[tuple[int, ...], list[Target]]]:
  """One decoder layer's tensors, named after `model.layers.{layer}.`, and their params (under
  `ours`, default layers_{layer})."""
  d, h = c.hidden_size, c.num_heads
  k, n, r, v = c.qk_head_dim, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
  ours = ours or f"layers_{layer}"
  attn = (ours, "self_attn")
  c_kv = c.kv_lora_rank
  entries = {
      "input_layernorm.weight": _one((ours, "input_layernorm", "scale"), (d,), _same),
      "post_attention_layernorm.weight": _one((ours, "post_attention_layernorm", "scale"), (d,),
                                              _same),
      "self_attn.kv_a_proj_with_mqa.weight": _one(attn + ("kv_a_proj_with_mqa",), (c_kv + r, d),
                                                  _linear((d, c_kv + r))),
      "self_attn.kv_a_layernorm.weight": _one(attn + ("kv_a_layernorm", "scale"), (c_kv,), _same),
      "self_attn.kv_b_proj.weight": _one(attn + ("kv_b_proj",), (h * (n + v), c_kv),
                                         _linear((c_kv, h, n + v))),
      "self_attn.o_proj.weight": _one(attn + ("o_proj",), (d, h * v), _linear((h, v, d))),
  }
  if c.q_lora_rank is None:
    entries["self_attn.q_proj.weight"] = _one(attn + ("q_proj",), (h * k, d), _linear((d, h, k)))
  else:
    q = c.q_lora_rank
    entries.update({
        "self_attn.q_a_proj.weight": _one(attn + ("q_a_proj",), (q, d), _linear((d, q))),
        "self_attn.q_a_layernorm.weight": _one(attn + ("q_a_layernorm", "scale"), (q,), _same),
        "self_attn.q_b_proj.weight": _one(attn + ("q_b_proj",), (h * k, q), _linear((q, h, k))),
    })
  mlp = (ours, "mlp")
  if not c.is_moe_layer(layer):
    entries.update({name: (shape, [((ours,) + path, f) for path, f in targets])
                    for name, (shape, targets)
                    in _mlp_entries(c, layer, "mlp", c.intermediate_size, "mlp.").items()})
  else:
    e, i = c.n_routed_experts, c.moe_intermediate_size
    entries.update({
        "mlp.gate.weight": _one(mlp + ("gate",), (e, d), _linear((d, e))),
        "mlp.experts.gate_up_proj": ((e, 2 * i, d), [
            (mlp + ("experts_gate_proj",), _experts_half(0, i)),
            (mlp + ("experts_up_proj",), _experts_half(1, i))]),
        "mlp.experts.down_proj": _one(mlp + ("experts_down_proj",), (e, d, i), _experts_transpose),
    })
    if c.scoring_func == "sigmoid":
      entries["mlp.gate.e_score_correction_bias"] = _one(mlp + ("e_score_correction_bias",), (e,),
                                                         _same)
    # Without shared experts transformers still builds them, zero wide, and saves their empty
    # tensors: optional entries that become no parameter (see params_from_hf).
    shared = _mlp_entries(c, layer, "shared_experts", i * c.n_shared_experts,
                          "mlp.shared_experts.")
    entries.update({name: (shape, [(mlp + path, f) for path, f in targets]
                           if c.n_shared_experts else [])
                    for name, (shape, targets) in shared.items()})
  return entries


def tensor_map(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], list[Target]]]:
  """HF tensor name -> (its expected shape, the params it becomes): DeepSeek's names for MLA,
  the Llama family's for the baselines (mla_jax/hf/llama.py). Experts use transformers' fused
  layout (gate_up_proj [E,2I,D], down_proj [E,D,I]); see fuse_expert_tensors. With
  model.num_mtp_layers, the MTP layers' entries too (mtp_entries)."""
  if config.attention != "mla":
    from mla_jax.hf.llama import llama_tensor_map

    return llama_tensor_map(config)
  c = config
  d = c.hidden_size
  out = {
      "model.embed_tokens.weight": _one(("embed_tokens",), (c.vocab_size, d), _same),
      "model.norm.weight": _one(("norm", "scale"), (d,), _same),
      "lm_head.weight": _one(("lm_head",), (c.vocab_size, d), _linear((d, c.vocab_size))),
  }
  for layer in range(c.num_layers):
    out.update({f"model.layers.{layer}.{name}": entry
                for name, entry in _layer_entries(c, layer).items()})
  for depth in range(c.num_mtp_layers):
    out.update(mtp_entries(c, depth, shared=out))
  return out


# An MTP layer's own tensors besides its decoder layer: name -> param path below mtp_layers_{k}.
MTP_TENSORS = {"enorm.weight": ("enorm", "scale"), "hnorm.weight": ("hnorm", "scale"),
               "eh_proj.weight": ("eh_proj",),
               "shared_head.norm.weight": ("shared_head", "norm", "scale")}
# The copies an MTP layer holds of the model's own tensors (the report shares them): name -> the
# model's tensor it copies, whose parameter it loads into.
MTP_SHARED = {"embed_tokens.weight": "model.embed_tokens.weight",
              "shared_head.head.weight": "lm_head.weight"}


def mtp_entries(config: ModelConfig, depth: int,
                shared: Mapping[str, tuple[tuple[int, ...], list[Target]]]
                ) -> dict[str, tuple[tuple[int, ...], list[Target]]]:
  """MTP module `depth` as `model.layers.{num_layers + depth}.*` -> mtp_layers_{depth}: its
  decoder layer (DeepSeekMoE when that layer index is an MoE layer), MTP_TENSORS, and MTP_SHARED
  mapped to the entries of the tensors they copy (looked up in `shared`, the model's map)."""
  c, d = config, config.hidden_size
  layer, ours = c.num_layers + depth, f"mtp_layers_{depth}"
  entries = _layer_entries(c, layer, ours)
  for name, path in MTP_TENSORS.items():
    if name == "eh_proj.weight":  # nn.Linear(2D, D): [D, 2D] -> [2D, D]
      entries[name] = _one((ours,) + path, (d, 2 * d), _linear((2 * d, d)))
    else:
      entries[name] = _one((ours,) + path, (d,), _same)
  for name, copied in MTP_SHARED.items():
    entries[name] = shared[copied]
  return {f"model.layers.{layer}.{name}": entry for name, entry in entries.items()}


_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def fuse_expert_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """DeepSeek's released checkpoints name each expert (experts.{e}.gate_proj.weight [I,D]);
  transformers keeps them fused. Stacks the former into the latter; other names pass through."""
  out, experts = {}, {}
  for name, array in tensors.items():
    match = _PER_EXPERT.match(name)
    if match is None:
      out[name] = array
    else:
      prefix, index, kind = match.groups()
      experts.setdefault(prefix, {}).setdefault(kind, {})[int(index)] = array
  for prefix, kinds in experts.items():
    count = len(kinds.get("gate", {}))
    for kind in ("gate", "up", "down"):
      found = sorted(kinds.get(kind, {}))
      if found != list(range(count)):
        raise ValueError(f"experts of {prefix} are incomplete: {kind}_proj for experts {found}, "
                         f"expected 0..{count - 1}")
    stack = lambda kind: np.stack([kinds[kind][e] for e in range(count)])  # noqa: E731
    out[f"{prefix}.gate_up_proj"] = np.concatenate([stack("gate"), stack("up")], axis=1)
    out[f"{prefix}.down_proj"] = stack("down")
  return out


def shared_copies(config: ModelConfig) -> dict[str, str]:
  """HF name of each MTP layer's copy of a model tensor (MTP_SHARED) -> the tensor it copies."""
  return {f"model.layers.{config.num_layers + depth}.{name}": copied
          for depth in range(config.num_mtp_layers) for name, copied in MTP_SHARED.items()}


def params_from_hf(config: ModelConfig, tensors: Mapping[str, np.ndarray],
                   place: Optional[Callable[[tuple[str, ...], np.ndarray], Any]] = None,
                   log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
  """Builds the Transformer's params pytree from HF-named tensors (either expert layout), in
  the scan layout when config.scan_layers.

  Non-parameter buffers a checkpoint may carry (rotary inv_freq) are ignored; anything else
  unexpected (an MTP layer config.num_mtp_layers does not announce included), missing or
  mis-shaped is a ValueError naming the tensor, raised before any is converted; the empty
  shared-expert tensors of a model without shared experts may be there or not. An MTP layer's
  copies of the embedding and the output head (shared_copies) may be left out; the model's own
  are loaded, and a copy that differs from them is named to `log` (without one: a ValueError).
  `place(path, array)` puts each converted array where it goes (default: NumPy).
  """
  tensors = fuse_expert_tensors(tensors)
  expected = tensor_map(config)
  copies = shared_copies(config)
  unexpected = sorted(name for name in tensors
                      if name not in expected and not name.endswith("rotary_emb.inv_freq"))
  if unexpected:
    after_last = f"model.layers.{config.num_layers + config.num_mtp_layers}."
    hint = (f"; {after_last}* follows the last decoder layer: a multi-token-prediction layer, "
            "which config.json must announce with num_nextn_predict_layers"
            if any(name.startswith(after_last) for name in unexpected) else "")
    raise ValueError(f"unexpected tensors in checkpoint: {unexpected[:5]}"
                     f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all){hint}")
  missing = sorted(name for name, (_, targets) in expected.items()
                   if name not in tensors and name not in copies
                   and targets)  # an empty tensor may be left out
  if missing:
    raise ValueError(f"missing tensors in checkpoint: {missing[:5]}"
                     f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
  for name, (shape, _) in expected.items():
    if name in tensors and tuple(np.shape(tensors[name])) != shape:
      raise ValueError(f"tensor {name} has shape {tuple(np.shape(tensors[name]))}, expected {shape}")
  for name, copied in copies.items():
    if name in tensors and not np.array_equal(np.asarray(tensors[name]), np.asarray(tensors[copied])):
      difference = float(np.max(np.abs(np.asarray(tensors[name], np.float32)
                                       - np.asarray(tensors[copied], np.float32))))
      message = (f"{name} differs from {copied} (by up to {difference:.3g}): the MTP layer shares "
                 f"the model's embedding and output head, so {copied} is used for both")
      if log is None:
        raise ValueError(message)
      log(message)
  params: dict[str, Any] = {}
  for name, (_, targets) in expected.items():
    if name in copies or not targets:  # a copy: the model's own tensor is loaded under its name
      continue
    array = np.asarray(tensors[name])
    for path, convert in targets:
      node = params
      for key in path[:-1]:
        node = node.setdefault(key, {})
      value = convert(array)
      node[path[-1]] = value if place is None else place(path, value)
  return to_scan_layout(config, params)


def to_scan_layout(config: ModelConfig, params: dict[str, Any]) -> dict[str, Any]:
  """Checkpoints name every layer; with model.scan_layers the repeated ones are stacked on a
  leading `layers` axis (mla_jax.model.stack_layers). Unchanged otherwise."""
  if not config.scan_layers:
    return params
  from mla_jax.model import stack_layers

  return stack_layers(config, params)


def _leaf_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
                ) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_leaf_paths(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def hf_tensors_from_params(config: ModelConfig, params: Mapping[str, Any]
                           ) -> dict[str, np.ndarray]:
  """The inverse of params_from_hf: HF-named NumPy tensors from a params tree (either layer
  layout; the scan layout is unstacked first), each in its parameter's dtype, experts in
  transformers' fused layout. Loading the result with params_from_hf gives the same arrays bit
  for bit. Raises ValueError naming a parameter the config's tensor map lacks (params of another
  model) or one it expects and the tree lacks."""
  from mla_jax.layers.params import unbox

  params = unbox(params)
  if "layers" in params:
    from mla_jax.model import unstack_layers

    params = unstack_layers(config, params)
  leaves = _leaf_paths(params)
  out: dict[str, np.ndarray] = {}
  used: set[tuple[str, ...]] = set()
  empty_dtype = np.asarray(params["embed_tokens"]).dtype
  for name, (shape, targets) in tensor_map(config).items():
    if not targets:  # zero-width shared experts, as transformers saves them
      out[name] = np.zeros(shape, empty_dtype)
      continue
    missing = [path for path, _ in targets if path not in leaves]
    if missing:
      raise ValueError(f"params lack {'/'.join(missing[0])}, which {name} is made of: they are "
                       "not this config's model")
    arrays = [np.asarray(leaves[path]) for path, _ in targets]
    tensor = np.empty(shape, arrays[0].dtype)
    for (path, convert), array in zip(targets, arrays):
      try:
        convert.put(tensor, array)
      except ValueError:  # a reshape or broadcast that does not fit: a mis-shaped parameter
        raise ValueError(f"parameter {'/'.join(path)} has shape {array.shape}, which does not "
                         f"make {name} of shape {shape}: params of another model") from None
      used.add(path)
    out[name] = tensor
  extra = sorted("/".join(path) for path in leaves if path not in used)
  if extra:
    raise ValueError(f"params hold {extra[:3]}{' ...' if len(extra) > 3 else ''}, which no "
                     "Hugging Face tensor of this config holds: they are not this config's model")
  return out
