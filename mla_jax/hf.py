"""Hugging Face DeepseekV2/V3 checkpoints <-> mla-jax: config translation and tensor mapping.

Every tensor name is mapped explicitly (no pattern guessing), and a missing, unexpected or
mis-shaped tensor is an error naming it. Hugging Face's nn.Linear stores [out, in]; mla-jax
stores input axes first with heads split out, so each mapping is a transpose and a reshape.
DeepSeekMoE layers are not modelled yet: a checkpoint with routed experts is refused.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from mla_jax.config import ModelConfig

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


def model_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """Translates a DeepseekV2/V3 config.json mapping into a ModelConfig."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"model_type={model_type!r} is not supported: allowed "
                     f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  layers = hf["num_hidden_layers"]
  dense_layers = hf.get("first_k_dense_replace", 0)
  if hf.get("n_routed_experts") and dense_layers < layers:
    raise ValueError(f"first_k_dense_replace={dense_layers} < num_hidden_layers={layers}: layers "
                     "with DeepSeekMoE experts are not supported yet")
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
  values.update(overrides)
  return ModelConfig(**values)


def _linear(shape_in_first: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
  """[out, in] -> [in, *out split]: transpose, then split an axis into e.g. (H, K) or (H, V)."""
  return lambda w: np.ascontiguousarray(w.T).reshape(shape_in_first)


def _same(w: np.ndarray) -> np.ndarray:
  return w


def tensor_map(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], Callable]]:
  """HF tensor name -> (mla-jax param path, expected HF shape, conversion)."""
  c = config
  d, h, i = c.hidden_size, c.num_heads, c.intermediate_size
  k, n, r, v = c.qk_head_dim, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
  out = {
      "model.embed_tokens.weight": (("embed_tokens",), (c.vocab_size, d), _same),
      "model.norm.weight": (("norm", "scale"), (d,), _same),
      "lm_head.weight": (("lm_head",), (c.vocab_size, d), _linear((d, c.vocab_size))),
  }
  for layer in range(c.num_layers):
    hf, ours = f"model.layers.{layer}.", f"layers_{layer}"
    attn = (ours, "self_attn")
    entries = {
        "input_layernorm.weight": ((ours, "input_layernorm", "scale"), (d,), _same),
        "post_attention_layernorm.weight": ((ours, "post_attention_layernorm", "scale"), (d,), _same),
        "mlp.gate_proj.weight": ((ours, "mlp", "gate_proj"), (i, d), _linear((d, i))),
        "mlp.up_proj.weight": ((ours, "mlp", "up_proj"), (i, d), _linear((d, i))),
        "mlp.down_proj.weight": ((ours, "mlp", "down_proj"), (d, i), _linear((i, d))),
        "self_attn.kv_a_proj_with_mqa.weight": (
            attn + ("kv_a_proj_with_mqa",), (c.kv_lora_rank + r, d), _linear((d, c.kv_lora_rank + r))),
        "self_attn.kv_a_layernorm.weight": (attn + ("kv_a_layernorm", "scale"), (c.kv_lora_rank,), _same),
        "self_attn.kv_b_proj.weight": (
            attn + ("kv_b_proj",), (h * (n + v), c.kv_lora_rank), _linear((c.kv_lora_rank, h, n + v))),
        "self_attn.o_proj.weight": (attn + ("o_proj",), (d, h * v), _linear((h, v, d))),
    }
    if c.q_lora_rank is None:
      entries["self_attn.q_proj.weight"] = (attn + ("q_proj",), (h * k, d), _linear((d, h, k)))
    else:
      q = c.q_lora_rank
      entries.update({
          "self_attn.q_a_proj.weight": (attn + ("q_a_proj",), (q, d), _linear((d, q))),
          "self_attn.q_a_layernorm.weight": (attn + ("q_a_layernorm", "scale"), (q,), _same),
          "self_attn.q_b_proj.weight": (attn + ("q_b_proj",), (h * k, q), _linear((q, h, k))),
      })
    out.update({hf + name: entry for name, entry in entries.items()})
  return out


def params_from_hf(config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Builds the Transformer's params pytree (NumPy arrays) from HF-named tensors.

  Non-parameter buffers a checkpoint may carry (rotary inv_freq) are ignored; anything else
  unexpected, missing or mis-shaped is an error naming the tensor.
  """
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
  params: dict[str, Any] = {}
  for name, (path, shape, convert) in expected.items():
    array = np.asarray(tensors[name])
    if array.shape != shape:
      raise ValueError(f"tensor {name} has shape {array.shape}, expected {shape}")
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = convert(array)
  return params
