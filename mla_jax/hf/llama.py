"""Hugging Face Llama, Qwen2 and Mistral checkpoints -> mla-jax's MHA/GQA/MQA baseline attention.

These families share one layout: pre-norm blocks with RMSNorm, a SwiGLU MLP, and attention with
`num_key_value_heads` key/value heads of `head_dim` features, RoPE on all of them in the
half-rotation layout (pairs x_i, x_{i+head_dim/2}), softmax scale head_dim ** -0.5. In mla-jax's
baseline that is qk_nope_head_dim=0, qk_rope_head_dim=v_head_dim=head_dim, rope_interleave=False.
Qwen2 adds biases to q, k and v (model.qkv_bias). Tied embeddings (small Qwen2 models) load as an
LM head equal to the embedding: the same logits, trained apart afterwards. A sliding window
(Mistral, Qwen2 with use_sliding_window) equals full attention while a sequence fits in it, so
the model's max_seq_len is capped at the window, with a note.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from mla_jax.config.model import ModelConfig
from mla_jax.hf.tensors import Target, _linear, _mlp_entries, _one, _same

LLAMA_MODEL_TYPES = ("llama", "qwen2", "mistral")


def _get(hf: Mapping[str, Any], name: str, source: str, kind: type = int, default: Any = ...):
  value = hf.get(name)
  if value is None:
    if default is ...:
      raise ValueError(f"{source} has no {name!r}, which a {hf.get('model_type')} config needs: "
                       "the file is incomplete; download it again")
    return default
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
    raise ValueError(f"{source}: {name}={value!r} is invalid: expected {kind.__name__}")
  return value


def _sliding_window(hf: Mapping[str, Any], source: str) -> int | None:
  """The window a layer of this model attends within, or None when every layer is full."""
  window = hf.get("sliding_window")
  if hf.get("model_type") == "qwen2":
    layer_types = hf.get("layer_types") or []
    if not hf.get("use_sliding_window") and "sliding_attention" not in layer_types:
      return None
  if window is None:
    return None
  if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
    raise ValueError(f"{source}: sliding_window={window!r} is invalid: expected a positive "
                     "integer or null")
  return window


def llama_config_from_hf(hf: Mapping[str, Any], source: str = "config.json",
                         log: Callable[[str], None] = lambda _: None,
                         **overrides: Any) -> ModelConfig:
  """A Llama / Qwen2 / Mistral config.json mapping -> the baseline ModelConfig (attention mha,
  gqa or mqa by num_key_value_heads). Raises ValueError naming `source` and the field for a
  missing field, a wrong type or an option mla-jax does not compute (RoPE scaling other than
  the default, partial rotary, Llama's attention_bias or mlp_bias, an activation other than
  silu). `log` receives the notes (tied embeddings, a sliding window capping max_seq_len)."""
  model_type = hf.get("model_type")
  if model_type not in LLAMA_MODEL_TYPES:
    raise ValueError(f"{source}: model_type={model_type!r} is not a Llama-family model: allowed "
                     f"{', '.join(LLAMA_MODEL_TYPES)}")
  heads = _get(hf, "num_attention_heads", source)
  hidden = _get(hf, "hidden_size", source)
  head_dim = _get(hf, "head_dim", source, default=hidden // heads)
  kv_heads = _get(hf, "num_key_value_heads", source, default=heads)
  for name in ("attention_bias", "mlp_bias"):
    if hf.get(name):
      raise ValueError(f"{source}: {name}=True is not supported: mla-jax's baseline has no "
                       f"{'o_proj' if name == 'attention_bias' else 'MLP'} bias")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{source}: hidden_act={hf.get('hidden_act')!r} is not supported: mla-jax's "
                     "MLP is SwiGLU (silu)")
  if hf.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"{source}: partial_rotary_factor={hf.get('partial_rotary_factor')} is not "
                     "supported: mla-jax rotates every feature of a head")
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default":
    raise ValueError(f"{source}: RoPE scaling {kind!r} is not supported for {model_type}: "
                     "allowed default")
  max_len = _get(hf, "max_position_embeddings", source)
  window = _sliding_window(hf, source)
  if window is not None and window < max_len:
    log(f"{source}: sliding_window={window} < max_position_embeddings={max_len}: max_seq_len "
        f"is {window}, within which sliding-window attention equals full attention")
    max_len = window
  if hf.get("tie_word_embeddings"):
    log(f"{source}: tie_word_embeddings=True: lm_head is loaded as a copy of embed_tokens (the "
        "same logits; training updates the two apart)")
  attention = "mha" if kv_heads == heads else "mqa" if kv_heads == 1 else "gqa"
  values = dict(
      vocab_size=_get(hf, "vocab_size", source), hidden_size=hidden,
      num_layers=_get(hf, "num_hidden_layers", source), num_heads=heads, q_lora_rank=None,
      kv_lora_rank=head_dim,  # unused by the baselines; any positive value
      qk_nope_head_dim=0, qk_rope_head_dim=head_dim, v_head_dim=head_dim,
      intermediate_size=_get(hf, "intermediate_size", source),
      rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
      rope_interleave=False, rms_norm_eps=_get(hf, "rms_norm_eps", source, float, 1e-6),
      max_seq_len=max_len, attention=attention,
      num_kv_heads=kv_heads if attention == "gqa" else None,
      qkv_bias=model_type == "qwen2",
      initializer_range=_get(hf, "initializer_range", source, float, 0.02))
  values.update(overrides)
  try:
    return ModelConfig(**values)
  except ValueError as err:
    raise ValueError(f"{source}: {err}") from None


def llama_tensor_map(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], list[Target]]]:
  """HF tensor name -> (its expected shape, the params it becomes) for a baseline model (the
  Llama family's names; q/k/v biases with model.qkv_bias)."""
  c = config
  d, h, g, k, v = c.hidden_size, c.num_heads, c.kv_heads, c.qk_head_dim, c.v_head_dim
  out = {
      "model.embed_tokens.weight": _one(("embed_tokens",), (c.vocab_size, d), _same),
      "model.norm.weight": _one(("norm", "scale"), (d,), _same),
      "lm_head.weight": _one(("lm_head",), (c.vocab_size, d), _linear((d, c.vocab_size))),
  }
  for layer in range(c.num_layers):
    ours, attn = f"layers_{layer}", (f"layers_{layer}", "self_attn")
    entries = {
        "input_layernorm.weight": _one((ours, "input_layernorm", "scale"), (d,), _same),
        "post_attention_layernorm.weight": _one((ours, "post_attention_layernorm", "scale"),
                                                (d,), _same),
        "self_attn.q_proj.weight": _one(attn + ("q_proj",), (h * k, d), _linear((d, h, k))),
        "self_attn.k_proj.weight": _one(attn + ("k_proj",), (g * k, d), _linear((d, g, k))),
        "self_attn.v_proj.weight": _one(attn + ("v_proj",), (g * v, d), _linear((d, g, v))),
        "self_attn.o_proj.weight": _one(attn + ("o_proj",), (d, h * v), _linear((h, v, d))),
    }
    if c.qkv_bias:
      entries.update({
          "self_attn.q_proj.bias": _one(attn + ("q_bias",), (h * k,), _linear((h, k))),
          "self_attn.k_proj.bias": _one(attn + ("k_bias",), (g * k,), _linear((g, k))),
          "self_attn.v_proj.bias": _one(attn + ("v_bias",), (g * v,), _linear((g, v))),
      })
    entries.update({name: (shape, [((ours,) + path, f) for path, f in targets])
                    for name, (shape, targets)
                    in _mlp_entries(c, layer, "mlp", c.intermediate_size, "mlp.").items()})
    out.update({f"model.layers.{layer}.{name}": entry for name, entry in entries.items()})
  return out


def untie_embeddings(hf: Mapping[str, Any], tensors: dict[str, np.ndarray]
                     ) -> dict[str, np.ndarray]:
  """With tie_word_embeddings and no lm_head.weight in the files, lm_head.weight = the
  embedding (transformers does the same when it ties them)."""
  if hf.get("tie_word_embeddings") and "lm_head.weight" not in tensors:
    return {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}
  return tensors
