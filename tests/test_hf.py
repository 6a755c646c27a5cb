"""Parity with Hugging Face transformers' DeepseekV2/V3 (PyTorch, CPU), built tiny and random here.

All layers dense (first_k_dense_replace = num_hidden_layers) until DeepSeekMoE lands; the
attention, RoPE layouts, YaRN and norms are the real ones.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mla_jax
from mla_jax.hf import model_config_from_hf, params_from_hf
from tests.helpers import rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
              v_head_dim=12, first_k_dense_replace=2, n_routed_experts=4, n_shared_experts=1,
              num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=128,
              rms_norm_eps=1e-6, tie_word_embeddings=False)


def _yarn(mscale, mscale_all_dim):
  return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
          "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0,
          "mscale": mscale, "mscale_all_dim": mscale_all_dim}


CASES = {
    # DeepSeek-V2-Lite style: no query compression, YaRN with mscale == mscale_all_dim.
    "v2_no_q_lora_yarn": ("DeepseekV2", dict(q_lora_rank=None, rope_parameters=_yarn(0.707, 0.707))),
    "v2_q_lora_yarn": ("DeepseekV2", dict(q_lora_rank=32, rope_parameters=_yarn(1.0, 0.5))),
    # V3 with interleaved RoPE and a cos/sin attention factor != 1 (mscale != mscale_all_dim).
    "v3_interleave_yarn": ("DeepseekV3", dict(q_lora_rank=32, rope_interleave=True,
                                              rope_parameters=_yarn(1.0, 0.5))),
    "v3_half_rotation": ("DeepseekV3", dict(q_lora_rank=32, rope_interleave=False,
                                            rope_parameters={"rope_type": "default",
                                                             "rope_theta": 10000.0})),
}


def _hf_model(name):
  family, extra = CASES[name]
  config = getattr(transformers, f"{family}Config")(**COMMON, **extra)
  config._attn_implementation = "eager"
  torch.manual_seed(0)
  model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
  with torch.no_grad():  # larger-than-init weights and non-unit norms, so mistakes show
    for pname, p in model.named_parameters():
      p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in pname else 0.15 * torch.randn_like(p))
  return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(name):
  hf_model = _hf_model(name)
  cfg = model_config_from_hf(hf_model.config.to_dict())
  tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  params = jax.tree_util.tree_map(jnp.asarray, params_from_hf(cfg, tensors))
  tokens = np.random.default_rng(0).integers(0, 97, (2, 40))
  with torch.no_grad():
    expected = hf_model(torch.as_tensor(tokens)).logits.numpy()
  model = mla_jax.Transformer(cfg)
  for impl in ("naive", "absorbed"):
    logits, _ = model.apply({"params": params}, jnp.asarray(tokens), attn_impl=impl)
    assert np.abs(np.asarray(logits) - expected).max() <= 1e-4, impl
    assert rel_err(logits, expected) <= 1e-5, impl
  # Decode with the latent cache reproduces transformers' positions too.
  cache = mla_jax.init_cache(cfg, 2, 48)
  prefix, cache = model.apply({"params": params}, jnp.asarray(tokens[:, :30]), cache=cache)
  steps = [prefix]
  for t in range(30, 40):
    logits, cache = model.apply({"params": params}, jnp.asarray(tokens[:, t:t + 1]), cache=cache)
    steps.append(logits)
  assert rel_err(jnp.concatenate(steps, axis=1), expected) <= 1e-5


def test_broken_checkpoints_are_named():
  hf_model = _hf_model("v3_interleave_yarn")
  cfg = model_config_from_hf(hf_model.config.to_dict())
  tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  missing = dict(tensors)
  del missing["model.layers.1.self_attn.kv_b_proj.weight"]
  with pytest.raises(ValueError, match=r"missing tensors.*model\.layers\.1\.self_attn\.kv_b_proj"):
    params_from_hf(cfg, missing)
  with pytest.raises(ValueError, match=r"tensor model\.norm\.weight has shape \(3,\)"):
    params_from_hf(cfg, dict(tensors, **{"model.norm.weight": np.ones(3)}))
  with pytest.raises(ValueError, match=r"unexpected tensors.*model\.layers\.0\.mlp\.experts"):
    params_from_hf(cfg, dict(tensors, **{"model.layers.0.mlp.experts.0.w": np.ones(3)}))
  with pytest.raises(ValueError, match="model_type='llama' is not supported"):
    model_config_from_hf(dict(hf_model.config.to_dict(), model_type="llama"))
  with pytest.raises(ValueError, match="first_k_dense_replace=1 < num_hidden_layers=2"):
    model_config_from_hf(dict(hf_model.config.to_dict(), first_k_dense_replace=1))
