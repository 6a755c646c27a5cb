"""Hugging Face DeepseekV2/V3 checkpoints <-> mla-jax: config translation and tensor mapping.

Every tensor name is mapped explicitly (no pattern guessing), and a missing, unexpected or
mis-shaped tensor is an error naming it. Hugging Face's nn.Linear stores [out, in]; mla-jax
stores input axes first with heads split out, so each mapping is a transpose and a reshape.
Both expert layouts load: DeepSeek's released per-expert tensors and transformers' fused ones.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import numpy as np

from mla_jax.config import ModelConfig

if TYPE_CHECKING:
  from mla_jax.model import Transformer

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


def model_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """Translates a DeepseekV2/V3 config.json mapping into a ModelConfig."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"model_type={model_type!r} is not supported: allowed "
                     f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  layers = hf["num_hidden_layers"]
  if hf.get("attention_bias"):
    raise ValueError("attention_bias=True is not supported: DeepSeek checkpoints have no biases")
  if hf.get("tie_word_embeddings"):
    raise ValueError("tie_word_embeddings=True is not supported: DeepSeek's LM head is untied")
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
  kind = rope.get("rope_type", rope.get("type", "default"))
  rope_scaling = None
  if kind == "yarn":
    rope_scaling = {k: rope[k] for k in ("factor", "original_max_position_embeddings",
                                         "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
                    if rope.get(k) is not None}
  elif kind != "default":
    raise ValueError(f"rope_scaling type {kind!r} is not supported: allowed default, yarn")
  values = dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=layers,
      num_heads=hf["num_attention_heads"], q_lora_rank=hf.get("q_lora_rank"),
      kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
      qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
      intermediate_size=hf["intermediate_size"], rope_theta=float(rope_theta),
      rope_scaling=rope_scaling,
      # V2's reference code de-interleaves before rotating: the same as rotating interleaved pairs.
      rope_interleave=hf.get("rope_interleave", True),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      max_seq_len=hf.get("max_position_embeddings", 4096),
      initializer_range=float(hf.get("initializer_range", 0.02)))
  if hf.get("n_routed_experts") and hf.get("first_k_dense_replace", 0) < layers:
    v3 = model_type == "deepseek_v3"
    values.update(
        n_routed_experts=hf["n_routed_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
        n_shared_experts=hf.get("n_shared_experts") or 0,
        moe_intermediate_size=hf["moe_intermediate_size"],
        first_k_dense_replace=hf.get("first_k_dense_replace", 0),
        scoring_func="sigmoid" if v3 else "softmax",
        topk_method="noaux_tc" if v3 else hf.get("topk_method", "greedy"),
        n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
        # DeepSeek-V2 either normalises or scales (its reference code); V3 normalises, then scales.
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        aux_loss_alpha=float(hf.get("aux_loss_alpha", 0.0)))
  values.update(overrides)
  return ModelConfig(**values)


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


def tensor_map(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], list[Target]]]:
  """HF tensor name -> (its expected shape, the params it becomes). Experts use transformers'
  fused layout (gate_up_proj [E,2I,D], down_proj [E,D,I]); see fuse_expert_tensors."""
  c = config
  d, h = c.hidden_size, c.num_heads
  k, n, r, v = c.qk_head_dim, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
  one = lambda path, shape, convert: (shape, [(path, convert)])  # noqa: E731
  out = {
      "model.embed_tokens.weight": one(("embed_tokens",), (c.vocab_size, d), _same),
      "model.norm.weight": one(("norm", "scale"), (d,), _same),
      "lm_head.weight": one(("lm_head",), (c.vocab_size, d), _linear((d, c.vocab_size))),
  }
  for layer in range(c.num_layers):
    hf, ours = f"model.layers.{layer}.", f"layers_{layer}"
    attn = (ours, "self_attn")
    c_kv = c.kv_lora_rank
    entries = {
        "input_layernorm.weight": one((ours, "input_layernorm", "scale"), (d,), _same),
        "post_attention_layernorm.weight": one((ours, "post_attention_layernorm", "scale"), (d,),
                                               _same),
        "self_attn.kv_a_proj_with_mqa.weight": one(attn + ("kv_a_proj_with_mqa",), (c_kv + r, d),
                                                   _linear((d, c_kv + r))),
        "self_attn.kv_a_layernorm.weight": one(attn + ("kv_a_layernorm", "scale"), (c_kv,), _same),
        "self_attn.kv_b_proj.weight": one(attn + ("kv_b_proj",), (h * (n + v), c_kv),
                                          _linear((c_kv, h, n + v))),
        "self_attn.o_proj.weight": one(attn + ("o_proj",), (d, h * v), _linear((h, v, d))),
    }
    if c.q_lora_rank is None:
      entries["self_attn.q_proj.weight"] = one(attn + ("q_proj",), (h * k, d), _linear((d, h, k)))
    else:
      q = c.q_lora_rank
      entries.update({
          "self_attn.q_a_proj.weight": one(attn + ("q_a_proj",), (q, d), _linear((d, q))),
          "self_attn.q_a_layernorm.weight": one(attn + ("q_a_layernorm", "scale"), (q,), _same),
          "self_attn.q_b_proj.weight": one(attn + ("q_b_proj",), (h * k, q), _linear((q, h, k))),
      })
    mlp = (ours, "mlp")
    if not c.is_moe_layer(layer):
      entries.update({name: (shape, [((ours,) + path, f) for path, f in targets])
                      for name, (shape, targets)
                      in _mlp_entries(c, layer, "mlp", c.intermediate_size, "mlp.").items()})
    else:
      e, i = c.n_routed_experts, c.moe_intermediate_size
      entries.update({
          "mlp.gate.weight": one(mlp + ("gate",), (e, d), _linear((d, e))),
          "mlp.experts.gate_up_proj": ((e, 2 * i, d), [
              (mlp + ("experts_gate_proj",), _experts_half(0, i)),
              (mlp + ("experts_up_proj",), _experts_half(1, i))]),
          "mlp.experts.down_proj": one(mlp + ("experts_down_proj",), (e, d, i), _experts_transpose),
      })
      if c.scoring_func == "sigmoid":
        entries["mlp.gate.e_score_correction_bias"] = one(mlp + ("e_score_correction_bias",), (e,),
                                                          _same)
      if c.n_shared_experts:
        shared = _mlp_entries(c, layer, "shared_experts", i * c.n_shared_experts,
                              "mlp.shared_experts.")
        entries.update({name: (shape, [(mlp + path, f) for path, f in targets])
                        for name, (shape, targets) in shared.items()})
    out.update({hf + name: entry for name, entry in entries.items()})
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


def params_from_hf(config: ModelConfig, tensors: Mapping[str, np.ndarray],
                   place: Optional[Callable[[tuple[str, ...], np.ndarray], Any]] = None
                   ) -> dict[str, Any]:
  """Builds the Transformer's params pytree from HF-named tensors (either expert layout), in
  the scan layout when config.scan_layers.

  Non-parameter buffers a checkpoint may carry (rotary inv_freq) are ignored; anything else
  unexpected, missing or mis-shaped is an error naming the tensor, raised before any is
  converted. `place(path, array)` puts each converted array where it goes (default: NumPy).
  """
  tensors = fuse_expert_tensors(tensors)
  expected = tensor_map(config)
  unexpected = sorted(name for name in tensors
                      if name not in expected and not name.endswith("rotary_emb.inv_freq"))
  if unexpected:
    raise ValueError(f"unexpected tensors in checkpoint: {unexpected[:5]}"
                     f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all)")
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


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
  """Memory-maps a .safetensors file: tensors are read from disk only when converted.

  Hand-written over the documented format (8-byte header size, JSON header, raw data) because
  the safetensors package's numpy backend cannot return bfloat16, DeepSeek's dtype, and its flax
  backend puts every tensor on the default device.
  """
  import ml_dtypes

  with open(path, "rb") as f:
    header_size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_size))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size)
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = ml_dtypes.bfloat16 if info["dtype"] == "BF16" else _SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
      raise ValueError(f"tensor {name} in {path} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    tensors[name] = data[begin:end].view(dtype).reshape(info["shape"])
  return tensors


def _safetensors_files(directory: Path) -> list[Path]:
  index = directory / "model.safetensors.index.json"
  if index.is_file():
    names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
      raise ValueError(f"{index} names shard files that are not there: {missing}")
    return [directory / n for n in names]
  files = sorted(directory.glob("*.safetensors"))
  if not files:
    raise ValueError(f"{directory} holds no *.safetensors file")
  return files


def load_hf(path: str | Path, dtype: Any = np.float32, mesh: Any = None
            ) -> tuple["Transformer", dict[str, Any]]:
  """(model, params) from a local Hugging Face DeepseekV2/V3 directory (config.json and
  *.safetensors, with or without an index). dtype applies to activations and parameters.

  With a mesh, each tensor is converted and placed on its devices (sharded as the tables in
  mla_jax.sharding say) as soon as it is read, so the whole model never sits on one device.
  """
  import jax
  import jax.numpy as jnp
  from mla_jax.model import Transformer
  from mla_jax.sharding import tree_shardings

  directory = Path(path).expanduser()
  config_file = directory / "config.json"
  if not config_file.is_file():
    raise ValueError(f"{directory} is not a Hugging Face model directory: no config.json")
  name = jnp.dtype(dtype).name
  config = model_config_from_hf(json.loads(config_file.read_text()), dtype=name, param_dtype=name)
  tensors: dict[str, np.ndarray] = {}
  for file in _safetensors_files(directory):
    tensors.update(read_safetensors(file))

  def place(param_path: tuple[str, ...], array: np.ndarray):
    router = param_path[-1] in ("gate", "e_score_correction_bias")  # float32, as DeepSeek keeps it
    array = array.astype(jnp.float32 if router else jnp.dtype(dtype))
    if mesh is None:
      return jnp.asarray(array)
    nested = array
    for key in reversed(param_path):  # {"layers_0": {...: array}}: the path names the axes
      nested = {key: nested}
    sharding = jax.tree_util.tree_leaves(tree_shardings(nested, mesh))[0]  # checks divisibility
    return jax.device_put(array, sharding)

  params = params_from_hf(config, tensors, place=place)
  return Transformer(config), params


def convert_hf(source: str | Path, workdir: str | Path, dtype: str = "float32") -> Path:
  """Writes a Hugging Face DeepseekV2/V3 directory as an mla-jax workdir that `mla-jax generate`
  runs: config.yaml, an orbax checkpoint of the parameters, and tokenizer.json when there is one."""
  import shutil

  import jax.numpy as jnp
  import yaml

  from mla_jax.checkpoint import Checkpoints
  from mla_jax.config import Config

  workdir = Path(workdir)
  if (workdir / "checkpoints").exists():
    raise ValueError(f"--out {str(workdir)!r} already holds checkpoints; choose a new directory")
  model, params = load_hf(source, dtype=jnp.dtype(dtype))  # every check happens before writing
  hf_config = json.loads((Path(source).expanduser() / "config.json").read_text())
  eos = hf_config.get("eos_token_id")
  config = Config(model=model.config, workdir=str(workdir))
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoints = Checkpoints(workdir, keep=1)
  try:
    checkpoints.save_params(0, params, {"model": model.config.to_dict(), "source": str(source),
                                        "eos_token_id": eos if isinstance(eos, int) else None})
  finally:
    checkpoints.close()
  (workdir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
  tokenizer = Path(source).expanduser() / "tokenizer.json"
  if tokenizer.is_file():
    shutil.copy(tokenizer, workdir / "tokenizer.json")
    (workdir / "special_tokens.json").write_text(json.dumps(
        {"eos_token_id": eos if isinstance(eos, int) else None}))
  return workdir
