"""Hugging Face DeepseekV2/V3 checkpoints <-> mla-jax: config translation and tensor mapping.

Every tensor name is mapped explicitly (no pattern guessing), and a missing, unexpected or
mis-shaped tensor is an error naming it. Hugging Face's nn.Linear stores [out, in]; mla-jax
stores input axes first with heads split out, so each mapping is a transpose and a reshape.
Both expert layouts load: DeepSeek's released per-expert tensors and transformers' fused ones.

DeepSeek-V3/R1 checkpoints also hold `num_nextn_predict_layers` multi-token-prediction (MTP)
layers after the last decoder layer (`model.layers.{num_hidden_layers + i}.*`: a decoder layer
plus embed_tokens, enorm, hnorm, eh_proj, shared_head.norm and shared_head.head). mla-jax decodes
one token per step and has no use for them: load_hf checks their names and shapes and skips them
with a one-line note. Any other tensor the model does not have is still an error. Their FP8
weights (with per-block `weight_scale_inv`) are dequantized to bfloat16 when converted.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import numpy as np

from mla_jax.config import DTYPES, ModelConfig

if TYPE_CHECKING:
  from mla_jax.model import Transformer

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


def _field(hf: Mapping[str, Any], name: str, source: str, default: Any = ...,
           kind: type = int) -> Any:
  """hf[name], checked to be a `kind` (or null where the default is None); a missing required
  field or a wrong type is a ValueError naming the file and the field."""
  if name not in hf or (hf[name] is None and default is ...):
    if default is ...:
      raise ValueError(f"{source} has no {name!r}, which a DeepseekV2/V3 config needs: the file "
                       "is incomplete or not a DeepSeek config; download it again")
    return default
  value = hf[name]
  if value is None or (kind is float and isinstance(value, int) and not isinstance(value, bool)):
    return value if value is None else float(value)
  if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
    raise ValueError(f"{source}: {name}={value!r} is invalid: expected {kind.__name__}")
  return value


def mtp_layer_count(hf: Mapping[str, Any], source: str = "config.json") -> int:
  """num_nextn_predict_layers: DeepSeek-V3's multi-token-prediction layers (0 when absent)."""
  count = _field(hf, "num_nextn_predict_layers", source, default=0) or 0
  if count < 0:
    raise ValueError(f"{source}: num_nextn_predict_layers={count} is invalid: must be >= 0")
  return count


def model_config_from_hf(hf: Mapping[str, Any], source: str = "config.json",
                         **overrides: Any) -> ModelConfig:
  """Translates a DeepseekV2/V3 config.json mapping into a ModelConfig.

  The latent norms keep DeepSeek's epsilon of 1e-6 (ModelConfig.latent_norm_eps), whatever
  rms_norm_eps says. Raises ValueError naming `source` (the file) and the field for a missing
  field, a wrong type, an unsupported option or a value ModelConfig refuses.
  """
  if not isinstance(hf, Mapping):
    raise ValueError(f"{source} must hold a JSON object, got {type(hf).__name__}")
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"{source}: model_type={model_type!r} is not supported: allowed "
                     f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  req = lambda name, kind=int: _field(hf, name, source, kind=kind)  # noqa: E731
  opt = lambda name, default, kind=int: _field(hf, name, source, default, kind)  # noqa: E731
  layers = req("num_hidden_layers")
  if hf.get("attention_bias"):
    raise ValueError(f"{source}: attention_bias=True is not supported: DeepSeek checkpoints have "
                     "no biases")
  if hf.get("tie_word_embeddings"):
    raise ValueError(f"{source}: tie_word_embeddings=True is not supported: DeepSeek's LM head is "
                     "untied")
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if not isinstance(rope, Mapping):
    raise ValueError(f"{source}: rope_scaling={rope!r} is invalid: expected an object or null")
  rope = dict(rope)
  rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
  kind = rope.get("rope_type", rope.get("type", "default"))
  rope_scaling = None
  if kind == "yarn":
    rope_scaling = {k: rope[k] for k in ("factor", "original_max_position_embeddings",
                                         "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
                    if rope.get(k) is not None}
  elif kind != "default":
    raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported: allowed default, "
                     "yarn")
  values = dict(
      vocab_size=req("vocab_size"), hidden_size=req("hidden_size"), num_layers=layers,
      num_heads=req("num_attention_heads"), q_lora_rank=opt("q_lora_rank", None),
      kv_lora_rank=req("kv_lora_rank"), qk_nope_head_dim=req("qk_nope_head_dim"),
      qk_rope_head_dim=req("qk_rope_head_dim"), v_head_dim=req("v_head_dim"),
      intermediate_size=req("intermediate_size"), rope_theta=rope_theta,
      rope_scaling=rope_scaling,
      # V2's reference code de-interleaves before rotating: the same as rotating interleaved pairs.
      rope_interleave=opt("rope_interleave", True, bool),
      rms_norm_eps=opt("rms_norm_eps", 1e-6, float),
      latent_norm_eps=1e-6,  # q_a_layernorm, kv_a_layernorm: built without eps in the reference
      max_seq_len=opt("max_position_embeddings", 4096),
      initializer_range=opt("initializer_range", 0.02, float))
  routed = opt("n_routed_experts", None)
  first_dense = opt("first_k_dense_replace", 0) or 0
  if routed and first_dense < layers:
    v3 = model_type == "deepseek_v3"
    values.update(
        n_routed_experts=routed, num_experts_per_tok=req("num_experts_per_tok"),
        n_shared_experts=opt("n_shared_experts", 0) or 0,
        moe_intermediate_size=req("moe_intermediate_size"),
        first_k_dense_replace=first_dense,
        scoring_func="sigmoid" if v3 else "softmax",
        topk_method="noaux_tc" if v3 else opt("topk_method", "greedy", str),
        n_group=opt("n_group", 1) or 1, topk_group=opt("topk_group", 1) or 1,
        # DeepSeek-V2 either normalises or scales (its reference code); V3 normalises, then scales.
        norm_topk_prob=bool(opt("norm_topk_prob", False, bool)),
        routed_scaling_factor=opt("routed_scaling_factor", 1.0, float),
        aux_loss_alpha=opt("aux_loss_alpha", 0.0, float))
  values.update(overrides)
  mtp_layer_count(hf, source)  # checked here too, so a bad value is refused before any tensor
  try:
    return ModelConfig(**values)
  except ValueError as err:  # e.g. "model.n_group=8 is invalid: ...": say which file it came from
    raise ValueError(f"{source}: {err}") from None


Conversion = Callable[[np.ndarray], np.ndarray]
Target = tuple[tuple[str, ...], Conversion]  # (param path, how to get it from the HF tensor)


def _linear(shape_in_first: tuple[int, ...]) -> Conversion:
  """[out, in] -> [in, *out split]: transpose, then split an axis into e.g. (H, K) or (H, V)."""
  return lambda w: np.ascontiguousarray(w.T).reshape(shape_in_first)


def _same(w: np.ndarray) -> np.ndarray:
  return w


def _experts_half(half: int, size: int) -> Conversion:
  """Fused gate_up_proj [E, 2I, D] -> its gate (half 0) or up (half 1) part as [E, D, I]."""
  return lambda w: np.ascontiguousarray(w[:, half * size:(half + 1) * size].transpose(0, 2, 1))


def _experts_transpose(w: np.ndarray) -> np.ndarray:  # down_proj [E, D, I] -> [E, I, D]
  return np.ascontiguousarray(w.transpose(0, 2, 1))


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


def _layer_entries(c: ModelConfig, layer: int
                   ) -> dict[str, tuple[tuple[int, ...], list[Target]]]:
  """One decoder layer's tensors, named after `model.layers.{layer}.`, and their params."""
  d, h = c.hidden_size, c.num_heads
  k, n, r, v = c.qk_head_dim, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
  ours = f"layers_{layer}"
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
    if c.n_shared_experts:
      shared = _mlp_entries(c, layer, "shared_experts", i * c.n_shared_experts,
                            "mlp.shared_experts.")
      entries.update({name: (shape, [(mlp + path, f) for path, f in targets])
                      for name, (shape, targets) in shared.items()})
  return entries


def tensor_map(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], list[Target]]]:
  """HF tensor name -> (its expected shape, the params it becomes). Experts use transformers'
  fused layout (gate_up_proj [E,2I,D], down_proj [E,D,I]); see fuse_expert_tensors."""
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
  return out


# The tensors of a multi-token-prediction layer besides its decoder layer (DeepSeek-V3's
# released layout; eh_proj maps [normed embedding, normed hidden state] 2D -> D).
_MTP_HEAD = ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight",
             "shared_head.norm.weight", "shared_head.head.weight")


def mtp_tensor_shapes(config: ModelConfig, mtp_layers: int) -> dict[str, tuple[int, ...]]:
  """HF name -> shape of every tensor of the `mtp_layers` multi-token-prediction layers, which
  follow the last decoder layer (`model.layers.{num_layers + i}.*`); experts in the fused layout."""
  d, vocab = config.hidden_size, config.vocab_size
  head = dict(zip(_MTP_HEAD, [(vocab, d), (d,), (d,), (d, 2 * d), (d,), (vocab, d)]))
  out = {}
  for layer in range(config.num_layers, config.num_layers + mtp_layers):
    entries = {**{name: shape for name, (shape, _) in _layer_entries(config, layer).items()},
               **head}
    out.update({f"model.layers.{layer}.{name}": shape for name, shape in entries.items()})
  return out


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


def split_mtp_tensors(config: ModelConfig, tensors: Mapping[str, np.ndarray], mtp_layers: int
                      ) -> tuple[dict[str, np.ndarray], list[str]]:
  """(the main model's tensors, the sorted names of the multi-token-prediction tensors).

  The MTP tensors are checked against DeepSeek's layout (mtp_tensor_shapes, either expert layout):
  a name that is not part of it, or a wrong shape, is a ValueError naming the tensor. A checkpoint
  may hold all, some or none of them (some redistributions drop the MTP layer).
  """
  prefixes = tuple(f"model.layers.{layer}." for layer in
                   range(config.num_layers, config.num_layers + mtp_layers))
  main = {name: t for name, t in tensors.items() if not name.startswith(prefixes)}
  mtp = {name: t for name, t in tensors.items() if name not in main}
  expected = mtp_tensor_shapes(config, mtp_layers)
  for name, (prefix, index, kind) in ((n, m.groups()) for n in mtp
                                      if (m := _PER_EXPERT.match(n)) is not None):
    # One expert of the released layout: checked on its own, never stacked (nor read) here.
    fused = expected.get(f"{prefix}.{'down_proj' if kind == 'down' else 'gate_up_proj'}")
    if fused is not None and int(index) < fused[0]:
      expected[name] = fused[1:] if kind == "down" else (fused[1] // 2, fused[2])
  unknown = sorted(name for name in mtp if name not in expected)
  if unknown:
    raise ValueError(f"unexpected tensors in the multi-token-prediction layer: {unknown[:5]}"
                     f"{' ...' if len(unknown) > 5 else ''} ({len(unknown)} in all): not part of "
                     "DeepSeek's layout (a decoder layer plus " + ", ".join(_MTP_HEAD) + ")")
  for name, array in mtp.items():
    if tuple(np.shape(array)) != expected[name]:
      raise ValueError(f"tensor {name} of the multi-token-prediction layer has shape "
                       f"{tuple(np.shape(array))}, expected {expected[name]}")
  return main, sorted(mtp)


def params_from_hf(config: ModelConfig, tensors: Mapping[str, np.ndarray],
                   place: Optional[Callable[[tuple[str, ...], np.ndarray], Any]] = None
                   ) -> dict[str, Any]:
  """Builds the Transformer's params pytree from HF-named tensors (either expert layout), in
  the scan layout when config.scan_layers.

  Non-parameter buffers a checkpoint may carry (rotary inv_freq) are ignored; anything else
  unexpected (MTP layers included: see split_mtp_tensors), missing or mis-shaped is a ValueError
  naming the tensor, raised before any is converted. `place(path, array)` puts each converted
  array where it goes (default: NumPy).
  """
  tensors = fuse_expert_tensors(tensors)
  expected = tensor_map(config)
  unexpected = sorted(name for name in tensors
                      if name not in expected and not name.endswith("rotary_emb.inv_freq"))
  if unexpected:
    after_last = f"model.layers.{config.num_layers}."
    hint = (f"; {after_last}* follows the last decoder layer: a multi-token-prediction layer, "
            "which config.json must announce with num_nextn_predict_layers"
            if any(name.startswith(after_last) for name in unexpected) else "")
    raise ValueError(f"unexpected tensors in checkpoint: {unexpected[:5]}"
                     f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all){hint}")
  missing = sorted(name for name in expected if name not in tensors)
  if missing:
    raise ValueError(f"missing tensors in checkpoint: {missing[:5]}"
                     f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
  for name, (shape, _) in expected.items():
    if tuple(np.shape(tensors[name])) != shape:
      raise ValueError(f"tensor {name} has shape {tuple(np.shape(tensors[name]))}, expected {shape}")
  params: dict[str, Any] = {}
  for name, (_, targets) in expected.items():
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


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                      "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}
_DAMAGED = "the file is truncated or damaged; download it again"


def read_json(path: Path) -> Any:
  """A JSON file's contents; unreadable JSON is a ValueError naming the file and the position."""
  try:
    return json.loads(Path(path).read_bytes())
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    where = (f" ({err.msg} at line {err.lineno} column {err.colno})"
             if isinstance(err, json.JSONDecodeError) else "")
    raise ValueError(f"{path} is not valid JSON{where}: {_DAMAGED}") from None


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
  """Memory-maps a .safetensors file: tensors are read from disk only when converted.

  Hand-written over the documented format (8-byte header size, JSON header, raw data) because
  the safetensors package's numpy backend cannot return bfloat16, DeepSeek's dtype, and its flax
  backend puts every tensor on the default device. The header is checked against the file's size
  first, so a truncated or damaged file is a ValueError naming it (and the tensor), never a
  reshape error. FP8 tensors (DeepSeek's released V3/R1 files) come back as stored, in
  ml_dtypes' float8 types; see dequantize_fp8.
  """
  import ml_dtypes

  path = Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    header_size = int.from_bytes(head, "little") if len(head) == 8 else -1
    if header_size < 0 or 8 + header_size > size:
      raise ValueError(f"{path} is not a complete safetensors file ({size:,} bytes, shorter than "
                       f"the header it announces): {_DAMAGED}")
    try:
      header = json.loads(f.read(header_size))
    except (json.JSONDecodeError, UnicodeDecodeError):
      header = None
  if not isinstance(header, dict):
    raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object; "
                     f"{_DAMAGED}")
  data_size = size - 8 - header_size
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size) if data_size else None
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    kind = info.get("dtype") if isinstance(info, dict) else None
    dtype = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
             "F8_E5M2": ml_dtypes.float8_e5m2}.get(kind) or _SAFETENSORS_DTYPES.get(kind)
    if dtype is None:
      raise ValueError(f"tensor {name} in {path} has unsupported dtype {kind}")
    try:
      shape = tuple(int(n) for n in info["shape"])
      begin, end = (int(n) for n in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{path}: the header entry of tensor {name} is malformed; "
                       f"{_DAMAGED}") from None
    if end - begin != math.prod(shape) * np.dtype(dtype).itemsize or begin < 0:
      raise ValueError(f"{path}: tensor {name} of shape {shape} and dtype {kind} does not fit its "
                       f"byte range [{begin}, {end}); {_DAMAGED}")
    if end > data_size:
      raise ValueError(f"{path} is truncated: tensor {name} needs data bytes [{begin:,}, {end:,}) "
                       f"but the file holds {data_size:,}; download it again")
    tensors[name] = (np.zeros(shape, dtype) if data is None else
                     data[begin:end].view(dtype).reshape(shape))
  return tensors


class _BlockDequantized:
  """An FP8 weight [M,N] times its per-block scales [ceil(M/bm), ceil(N/bn)], computed only when
  read (np.asarray), so memory-mapped files stay unread until converted. As DeepSeek-V3's
  inference/kernel.py weight_dequant (y = x * s per block) and fp8_cast_bf16.py (to bfloat16)."""

  def __init__(self, weight: np.ndarray, scale: np.ndarray, block: tuple[int, int]):
    self.weight, self.scale, self.block = weight, scale, block
    self.shape = weight.shape

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    import ml_dtypes

    (bm, bn), (m, n) = self.block, self.shape
    scale = np.repeat(np.repeat(np.asarray(self.scale, np.float32), bm, 0), bn, 1)[:m, :n]
    out = (np.asarray(self.weight).astype(np.float32) * scale).astype(ml_dtypes.bfloat16)
    return out if dtype is None else out.astype(dtype)


def dequantize_fp8(tensors: Mapping[str, Any], block: tuple[int, int] = (128, 128),
                   source: str = "the checkpoint") -> dict[str, Any]:
  """Replaces each FP8 `X.weight` and its `X.weight_scale_inv` (DeepSeek's released V3/R1 layout,
  block-wise scales, config.json's quantization_config.weight_block_size) by the dequantized
  bfloat16 weight, lazily. An FP8 weight without scales, scales without their weight, or scales
  of the wrong shape are ValueErrors naming the tensor."""
  import ml_dtypes

  fp8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
  out = {name: t for name, t in tensors.items() if not name.endswith(".weight_scale_inv")}
  for name in sorted(set(tensors) - set(out)):
    weight_name = name[:-len("_scale_inv")]
    weight = tensors.get(weight_name)
    if weight is None or np.dtype(weight.dtype) not in fp8 or len(weight.shape) != 2:
      raise ValueError(f"{source}: {name} has no FP8 matrix {weight_name} to scale")
    (m, n), (bm, bn) = weight.shape, block
    expected = (-(-m // bm), -(-n // bn))
    if tuple(tensors[name].shape) != expected:
      raise ValueError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, expected "
                       f"{expected} (blocks of {bm}x{bn} over {weight_name} {(m, n)})")
    out[weight_name] = _BlockDequantized(weight, tensors[name], block)
  unscaled = sorted(name for name, t in out.items()
                    if isinstance(t, np.ndarray) and t.dtype in fp8)
  if unscaled:
    raise ValueError(f"{source}: FP8 tensors without their weight_scale_inv: {unscaled[:5]}"
                     f"{' ...' if len(unscaled) > 5 else ''} ({len(unscaled)} in all)")
  return out


def _fp8_block(hf: Mapping[str, Any], source: str) -> tuple[int, int]:
  """quantization_config.weight_block_size of an FP8 config.json ([128, 128] for DeepSeek-V3)."""
  quant = hf.get("quantization_config") or {}
  block = quant.get("weight_block_size", [128, 128]) if isinstance(quant, Mapping) else None
  if (not isinstance(block, (list, tuple)) or len(block) != 2
      or not all(isinstance(b, int) and b > 0 for b in block)):
    raise ValueError(f"{source}: quantization_config.weight_block_size={block!r} is invalid: "
                     "expected two positive integers, e.g. [128, 128]")
  return int(block[0]), int(block[1])


def _safetensors_files(directory: Path) -> list[Path]:
  index = directory / "model.safetensors.index.json"
  if index.is_file():
    weight_map = read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index} has no \"weight_map\" object: {_DAMAGED}")
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
      raise ValueError(f"{index} names shard files that are not there: {missing}")
    return [directory / n for n in names]
  files = sorted(directory.glob("*.safetensors"))
  if not files:
    raise ValueError(f"{directory} holds no *.safetensors file")
  return files


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32", "float": "float32",
                  "fp16": "float16", "f16": "float16", "half": "float16"}


def dtype_name(dtype: Any) -> str:
  """'float32', 'bfloat16' or 'float16' from a dtype, its name or a common alias (bf16, fp32,
  fp16, ...); anything else is a ValueError listing what is allowed."""
  if isinstance(dtype, str):
    name = _DTYPE_ALIASES.get(dtype.strip().lower(), dtype.strip().lower())
  else:
    try:
      name = np.dtype(dtype).name
    except TypeError:
      name = None
  if name not in DTYPES:
    raise ValueError(f"dtype={dtype!r} is not supported: allowed {', '.join(DTYPES)} "
                     "(or bf16, fp32, fp16)")
  return name


def _note(message: str) -> None:
  print(f"note: {message}", file=sys.stderr)


def load_hf(path: str | Path, dtype: Any = np.float32, mesh: Any = None,
            log: Callable[[str], None] = _note) -> tuple["Transformer", dict[str, Any]]:
  """(model, params) from a local Hugging Face DeepseekV2/V3 directory (config.json and
  *.safetensors, with or without an index). dtype (float32, bfloat16 or float16, as a dtype, a
  name or an alias such as "bf16") applies to activations and parameters.

  With a mesh, each tensor is converted and placed on its devices (sharded as the tables in
  mla_jax.sharding say) as soon as it is read, so the whole model never sits on one device.
  DeepSeek-V3's multi-token-prediction layers are checked and skipped, with a one-line note to
  `log` (default: stderr) naming them. Errors: ValueError naming the file, field or tensor.
  """
  import jax
  import jax.numpy as jnp
  from mla_jax.model import Transformer
  from mla_jax.sharding import tree_shardings

  name = dtype_name(dtype)
  directory = Path(path).expanduser()
  config_file = directory / "config.json"
  if not config_file.is_file():
    raise ValueError(f"{directory} is not a Hugging Face model directory: no config.json")
  hf_config = read_json(config_file)
  config = model_config_from_hf(hf_config, str(config_file), dtype=name, param_dtype=name)
  tensors: dict[str, np.ndarray] = {}
  for file in _safetensors_files(directory):
    tensors.update(read_safetensors(file))
  tensors = dequantize_fp8(tensors, _fp8_block(hf_config, str(config_file)), str(directory))
  tensors, mtp = split_mtp_tensors(config, tensors, mtp_layer_count(hf_config, str(config_file)))
  if mtp:
    layers = sorted({int(n.split(".")[2]) for n in mtp})
    names = ", ".join(f"model.layers.{i}.*" for i in layers)
    log(f"skipped the multi-token-prediction layer {names} ({len(mtp)} tensors: a decoder layer "
        f"plus {', '.join(_MTP_HEAD)}): mla-jax predicts one token per step and does not use it")

  def place(param_path: tuple[str, ...], array: np.ndarray):
    router = param_path[-1] in ("gate", "e_score_correction_bias")  # float32, as DeepSeek keeps it
    array = array.astype(jnp.float32 if router else jnp.dtype(name))
    if mesh is None:
      return jnp.asarray(array)
    nested = array
    for key in reversed(param_path):  # {"layers_0": {...: array}}: the path names the axes
      nested = {key: nested}
    sharding = jax.tree_util.tree_leaves(tree_shardings(nested, mesh))[0]  # checks divisibility
    return jax.device_put(array, sharding)

  params = params_from_hf(config, tensors, place=place)
  return Transformer(config), params


def convert_hf(source: str | Path, workdir: str | Path, dtype: str = "float32",
               log: Callable[[str], None] = _note) -> Path:
  """Writes a Hugging Face DeepseekV2/V3 directory as an mla-jax workdir that `mla-jax generate`
  runs: config.yaml, an orbax checkpoint of the parameters, special_tokens.json (the EOS id) and
  tokenizer.json when the source has one. Without one, `log` says so, and `generate` refuses
  text prompts on the workdir until a tokenizer.json is copied there (token ids still work)."""
  import shutil

  import yaml

  from mla_jax.checkpoint import Checkpoints, check_writable_directory
  from mla_jax.config import Config, TrainConfig

  workdir = Path(workdir)
  check_writable_directory(workdir, "--out")
  if (workdir / "checkpoints").exists():
    raise ValueError(f"--out {str(workdir)!r} already holds checkpoints; choose a new directory")
  model, params = load_hf(source, dtype=dtype, log=log)  # every check happens before writing
  directory = Path(source).expanduser()
  hf_config = read_json(directory / "config.json")
  eos = hf_config.get("eos_token_id")
  eos = eos if isinstance(eos, int) and not isinstance(eos, bool) else None
  # The workdir's train section is unused by generate, but must be valid for this model.
  train = TrainConfig(seq_len=min(TrainConfig.seq_len, model.config.max_seq_len))
  config = Config(model=model.config, train=train, workdir=str(workdir))
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoints = Checkpoints(workdir, keep=1)
  try:
    checkpoints.save_params(0, params, {"model": model.config.to_dict(), "source": str(source),
                                        "eos_token_id": eos})
  finally:
    checkpoints.close()
  (workdir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
  tokenizer = directory / "tokenizer.json"
  if tokenizer.is_file():
    shutil.copy(tokenizer, workdir / "tokenizer.json")
  else:
    log(f"no tokenizer.json in {directory}: `mla-jax generate` will refuse text prompts on "
        f"{workdir} until you copy the model's tokenizer.json there")
  (workdir / "special_tokens.json").write_text(json.dumps(
      {"eos_token_id": eos, "tokenizer": "tokenizer.json" if tokenizer.is_file() else None}))
  return workdir
