"""A Hugging Face DeepseekV2/V3 config.json -> ModelConfig: every field checked and named."""

from __future__ import annotations

from typing import Any, Mapping

from mla_jax.config.model import ModelConfig

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
  """Translates a DeepseekV2/V3 config.json mapping into a ModelConfig (num_nextn_predict_layers
becoming num_mtp_layers).

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
  values["num_mtp_layers"] = mtp_layer_count(hf, source)
  values.update(overrides)
  try:
    return ModelConfig(**values)
  except ValueError as err:  # e.g. "model.n_group=8 is invalid: ...": say which file it came from
    raise ValueError(f"{source}: {err}") from None
