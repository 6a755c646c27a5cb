"""Parity with Hugging Face transformers' DeepseekV2/V3 (PyTorch, CPU), built tiny and random here
and loaded through safetensors files, as a downloaded checkpoint would be."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mla_jax
from mla_jax.hf import (dequantize_fp8, dtype_name, fuse_expert_tensors, load_hf,
                        model_config_from_hf, params_from_hf)
from tests.helpers import rel_err
from tests.hf_parity import PARITY_INSTALL, assert_same_greedy_tokens, case_model, saved_case

torch = pytest.importorskip("torch", reason=f"Hugging Face parity tests need PyTorch: {PARITY_INSTALL}")
transformers = pytest.importorskip(
    "transformers", reason=f"Hugging Face parity tests need transformers: {PARITY_INSTALL}")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=24, qk_nope_head_dim=16,
              qk_rope_head_dim=8, v_head_dim=12, first_k_dense_replace=1, moe_intermediate_size=32,
              max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)


def _yarn(mscale, mscale_all_dim):
  return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
          "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0,
          "mscale": mscale, "mscale_all_dim": mscale_all_dim}


CASES = {
    # DeepSeek-V2-Lite style: no query compression, YaRN, greedy softmax routing, a shared expert.
    # rms_norm_eps=1e-2 here and in the V3 case: the latent norms must keep DeepSeek's 1e-6.
    "v2_no_q_lora_yarn": ("DeepseekV2", dict(
        rms_norm_eps=1e-2, q_lora_rank=None, rope_parameters=_yarn(0.707, 0.707),
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, topk_method="greedy",
        routed_scaling_factor=1.5)),
    # DeepSeek-V2 style: query compression, group-limited routing over 4 groups of 2. (Its YaRN
    # mscale equals mscale_all_dim, as in the released V2 models: with them unequal,
    # transformers 5.24's own cached DeepseekV2 generation departs from its full forward.)
    "v2_q_lora_group_limited": ("DeepseekV2", dict(
        q_lora_rank=32, rope_parameters=_yarn(0.707, 0.707), n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=2, topk_method="group_limited_greedy", n_group=4,
        topk_group=2)),
    # DeepSeek-V3 style: sigmoid routing, a non-zero correction bias, interleaved RoPE, YaRN.
    "v3_sigmoid_bias_yarn": ("DeepseekV3", dict(
        rms_norm_eps=1e-2, q_lora_rank=32, rope_interleave=True, rope_parameters=_yarn(1.0, 0.5),
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2,
        norm_topk_prob=True, routed_scaling_factor=2.5)),
    # Half-rotation RoPE and all-dense layers.
    "v3_half_rotation_dense": ("DeepseekV3", dict(
        q_lora_rank=32, rope_interleave=False, first_k_dense_replace=2, n_routed_experts=4,
        num_experts_per_tok=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}


def _hf_model(name):
  return case_model(CASES, COMMON, name)


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
  """A checkpoint directory written by transformers' save_pretrained, and the live HF model."""
  return saved_case(CASES, COMMON, request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def v3_checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp("v3")
  _hf_model("v3_sigmoid_bias_yarn").save_pretrained(directory)
  return directory


def test_logits_and_greedy_generation_match_transformers(saved):
  name, hf_model, directory = saved
  model, params = mla_jax.load_hf(directory)  # the public name
  cfg = model.config
  assert cfg.is_moe_layer(1) == (name != "v3_half_rotation_dense")
  tokens = np.random.default_rng(0).integers(0, 97, (2, 40))
  with torch.no_grad():
    expected = hf_model(torch.as_tensor(tokens)).logits.numpy()
  for impl in ("naive", "absorbed"):
    logits, _ = model.apply({"params": params}, jnp.asarray(tokens), attn_impl=impl)
    assert np.abs(np.asarray(logits) - expected).max() <= 1e-4, impl

  assert_same_greedy_tokens(hf_model, model, params, tokens[:, :8], 60)


def test_bf16_stays_close_to_float32(saved):
  _, _, directory = saved
  model32, params32 = load_hf(directory)
  model16, params16 = load_hf(directory, dtype=jnp.bfloat16)
  assert params16["embed_tokens"].dtype == jnp.bfloat16
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 24)))
  ref, _ = model32.apply({"params": params32}, tokens)
  for impl in ("naive", "absorbed"):
    low, _ = model16.apply({"params": params16}, tokens, attn_impl=impl)
    # bf16 keeps 8 bits of mantissa (errors of 1-2% of the logits' scale here), and a rounding
    # can flip a near-tied expert choice, which moves that one position a lot (seen: 53% at 1
    # of 48 positions). Stated bound: at 95% of positions the error is within 7% of the logits'
    # scale, and the top-1 token agrees at 95% of positions.
    per_position = jnp.abs(low - ref).max(-1) / jnp.abs(ref).max()  # [B,T]
    assert float(jnp.mean(per_position <= 0.07)) >= 0.95, (impl, per_position)
    assert float(jnp.mean(low.argmax(-1) == ref.argmax(-1))) >= 0.95, impl


def _per_expert(fused):
  """transformers' fused expert tensors -> DeepSeek's released experts.{e}.*_proj.weight."""
  per_expert = {}
  for key, value in fused.items():
    if key.endswith("mlp.experts.gate_up_proj"):
      prefix, i = key[:-len(".gate_up_proj")], value.shape[1] // 2
      for e in range(value.shape[0]):
        per_expert[f"{prefix}.{e}.gate_proj.weight"] = value[e, :i]
        per_expert[f"{prefix}.{e}.up_proj.weight"] = value[e, i:]
    elif key.endswith("mlp.experts.down_proj"):
      for e in range(value.shape[0]):
        per_expert[f"{key[:-len('.down_proj')]}.{e}.down_proj.weight"] = value[e]
    else:
      per_expert[key] = value
  return per_expert


def test_released_per_expert_layout_loads_the_same(saved):
  name, hf_model, _ = saved
  cfg = model_config_from_hf(hf_model.config.to_dict())
  fused = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  per_expert = _per_expert(fused)
  assert set(fuse_expert_tensors(per_expert)) == set(fused)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_from_hf(cfg, per_expert),
                         params_from_hf(cfg, fused))


def test_latent_norms_keep_the_reference_epsilon():
  """rms_norm_eps=1e-2 applies to the block norms only: q_a_layernorm and kv_a_layernorm use 1e-6
  in DeepSeek's code and transformers'. Applying 1e-2 there too is visibly wrong (the fault)."""
  hf_model = _hf_model("v3_sigmoid_bias_yarn")
  cfg = model_config_from_hf(hf_model.config.to_dict())
  assert (cfg.rms_norm_eps, cfg.latent_norm_eps) == (1e-2, 1e-6)
  params = params_from_hf(cfg, {k: v.detach().numpy() for k, v in hf_model.state_dict().items()})
  tokens = np.random.default_rng(3).integers(0, 97, (2, 12))
  with torch.no_grad():
    expected = hf_model(torch.as_tensor(tokens)).logits.numpy()
  for eps, agrees in ((1e-6, True), (1e-2, False)):
    model = mla_jax.Transformer(dataclasses.replace(cfg, latent_norm_eps=eps))
    logits, _ = model.apply({"params": params}, jnp.asarray(tokens))
    error = np.abs(np.asarray(logits) - expected).max()
    assert (error <= 1e-4) == agrees, (eps, error)


# An MTP layer's own tensors besides its decoder layer (DeepSeek-V3's released names, hidden 64);
# it also holds copies of model.embed_tokens.weight and lm_head.weight (embed_tokens.weight,
# shared_head.head.weight).
MTP_HEAD = {"enorm.weight": (64,), "hnorm.weight": (64,), "eh_proj.weight": (64, 128),
            "shared_head.norm.weight": (64,)}


BLOCK = 16  # FP8 scale blocks (DeepSeek-V3 uses 128); 16 gives several blocks per tiny matrix


def _fp8_quantize(w):
  """DeepSeek-V3's released format: float8_e4m3fn weights with one float32 scale per block
  (weight_scale_inv: the factor that dequantizes). Returns (fp8 weight, scales, dequantized as
  fp8_cast_bf16.py makes it: bfloat16, here widened to float32)."""
  import ml_dtypes

  m, n = w.shape
  blocks = np.pad(w, ((0, -m % BLOCK), (0, -n % BLOCK))).reshape(
      -(-m // BLOCK), BLOCK, -(-n // BLOCK), BLOCK)
  scale = (np.abs(blocks).max(axis=(1, 3)) / 448.0).astype(np.float32)  # e4m3's largest: 448
  expand = np.repeat(np.repeat(scale, BLOCK, 0), BLOCK, 1)[:m, :n]
  q = (w / expand).astype(ml_dtypes.float8_e4m3fn)
  return q, scale, (q.astype(np.float32) * expand).astype(ml_dtypes.bfloat16).astype(np.float32)


def _quantized(name, value):
  return (value.ndim == 2 and name.startswith("model.layers.") and name.endswith(".weight")
          and not any(part in name for part in ("norm", "mlp.gate.weight", "embed_tokens",
                                                "shared_head.head")))


@pytest.fixture(scope="module")
def v3_with_mtp(tmp_path_factory):
  """The V3 case as DeepSeek releases it: FP8 weights with block scales (quantization_config),
  per-expert tensors, and a multi-token-prediction layer model.layers.2.* (an MoE decoder layer,
  MTP_HEAD, and copies of the embedding and the head), announced by num_nextn_predict_layers.
  The transformers model gets the dequantized weights, so both sides compute with the same
  numbers. Returns (the transformers model, the directory, the MTP layer's dequantized tensors
  in transformers' fused expert layout)."""
  from safetensors.torch import save_file

  hf_model = _hf_model("v3_sigmoid_bias_yarn")
  fused = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  rng = np.random.default_rng(4)

  def draw(name, shape):  # as _hf_model draws: norms near 1, weights of 0.15
    return ((1.0 + 0.2 * rng.normal(size=shape)) if "norm" in name
            else 0.15 * rng.normal(size=shape)).astype(np.float32)

  mtp = {k.replace("model.layers.1.", "model.layers.2."): draw(k, v.shape)
         for k, v in fused.items() if k.startswith("model.layers.1.")}
  mtp.update({f"model.layers.2.{k}": draw(k, shape) for k, shape in MTP_HEAD.items()})
  mtp["model.layers.2.embed_tokens.weight"] = fused["model.embed_tokens.weight"]  # copies
  mtp["model.layers.2.shared_head.head.weight"] = fused["lm_head.weight"]
  released, dequantized = {}, {}
  for name, value in _per_expert({**fused, **mtp}).items():
    if _quantized(name, value):
      q, scale, dequantized[name] = _fp8_quantize(value)
      released[name] = torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn)
      released[name + "_scale_inv"] = torch.from_numpy(scale)
    else:
      released[name] = torch.from_numpy(np.ascontiguousarray(value))
      dequantized[name] = value
  main = fuse_expert_tensors({k: v for k, v in dequantized.items()
                              if not k.startswith("model.layers.2.")})
  hf_model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in main.items()})
  directory = tmp_path_factory.mktemp("v3_mtp")
  names = sorted(released)
  for part in range(2):  # two shards with an index, the MTP layer spread over both
    save_file({n: released[n].contiguous() for n in names[part::2]},
              str(directory / f"model-0000{part + 1}.safetensors"))
  (directory / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {n: f"model-0000{i % 2 + 1}.safetensors" for i, n in enumerate(names)}}))
  config = {**hf_model.config.to_dict(), "num_nextn_predict_layers": 1, "quantization_config": {
      "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
      "weight_block_size": [BLOCK, BLOCK]}}
  (directory / "config.json").write_text(json.dumps(config))
  return hf_model, directory, fuse_expert_tensors(
      {k: v for k, v in dequantized.items() if k.startswith("model.layers.2.")})


def _reference_mtp_logits(hf_model, mtp, tokens):
  """DeepSeek's MTP layer (as vLLM and SGLang run it) in float64: the main model's final hidden
  states from transformers, [enorm(Emb(t_{i+1})); hnorm(h_i)] @ eh_proj^T in NumPy, then the MTP
  decoder layer, shared_head.norm and the shared head as a one-layer transformers DeepseekV3
  (that layer MoE, its final norm shared_head.norm, its lm_head the model's) fed those inputs."""
  import copy

  main = copy.deepcopy(hf_model).double()
  main.config._experts_implementation = "eager"  # torch's grouped matmul has no float64
  with torch.no_grad():
    h = main.model(torch.as_tensor(tokens)).last_hidden_state.numpy()  # [B,T,D], after the norm
  eps = hf_model.config.rms_norm_eps
  rms = lambda x, w: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w  # noqa: E731
  get = lambda name: np.asarray(mtp[f"model.layers.2.{name}"], np.float64)  # noqa: E731
  embedded = get("embed_tokens.weight")[tokens[:, 1:]]
  x = np.concatenate([rms(embedded, get("enorm.weight")), rms(h[:, :-1], get("hnorm.weight"))],
                     axis=-1) @ get("eh_proj.weight").T  # [B,T-1,D]
  config = copy.deepcopy(hf_model.config)
  config.num_hidden_layers, config.first_k_dense_replace = 1, 0
  config._experts_implementation = "eager"
  block = transformers.DeepseekV3ForCausalLM(config).double().eval()
  state = {k.replace("model.layers.2.", "model.layers.0."): torch.from_numpy(np.asarray(v))
           for k, v in mtp.items() if not k.split("model.layers.2.")[1].startswith(
               tuple(MTP_HEAD) + ("embed_tokens", "shared_head"))}
  state.update({"model.norm.weight": torch.from_numpy(get("shared_head.norm.weight")),
                "lm_head.weight": torch.from_numpy(get("shared_head.head.weight")),
                "model.embed_tokens.weight": torch.from_numpy(get("embed_tokens.weight"))})
  block.load_state_dict({k: v.double() for k, v in state.items()})
  with torch.no_grad():
    return block(inputs_embeds=torch.from_numpy(x)).logits.numpy()


def test_v3_checkpoint_as_released_loads_fp8_and_its_mtp_layer(v3_with_mtp):
  from mla_jax.model import transformer_hidden
  from mla_jax.mtp import mtp_forward

  hf_model, directory, mtp = v3_with_mtp
  assert len(mtp) == 22  # the decoder layer (experts fused) + MTP_HEAD + the two copies
  notes = []
  model, params = load_hf(directory, log=notes.append)
  cfg = model.config
  assert notes == [] and cfg.num_layers == 2 and cfg.num_mtp_layers == 1
  assert "layers_2" not in params and cfg.is_moe_layer(2)
  assert params["mtp_layers_0"]["mlp"]["experts_down_proj"].shape == (8, 32, 64)
  tokens = np.random.default_rng(5).integers(0, 97, (2, 20))
  with torch.no_grad():
    expected = hf_model(torch.as_tensor(tokens)).logits.numpy()
  for impl in ("naive", "absorbed"):
    logits, _ = model.apply({"params": params}, jnp.asarray(tokens), attn_impl=impl)
    assert np.abs(np.asarray(logits) - expected).max() <= 1e-4, impl
  hidden, _, _ = transformer_hidden(cfg, params, jnp.asarray(tokens))
  (mtp_logits,), _ = mtp_forward(cfg, params, hidden, jnp.asarray(tokens))
  assert rel_err(mtp_logits, _reference_mtp_logits(hf_model, mtp, tokens)) <= 1e-5
  # Other MTP weights change the MTP logits and leave the main logits as they are.
  other = dict(params, mtp_layers_0=jax.tree_util.tree_map(lambda a: a[::-1],
                                                           params["mtp_layers_0"]))
  main_again, _ = model.apply({"params": other}, jnp.asarray(tokens))
  np.testing.assert_array_equal(main_again, model.apply({"params": params}, jnp.asarray(tokens))[0])
  (moved,), _ = mtp_forward(cfg, other, hidden, jnp.asarray(tokens))
  assert rel_err(moved, mtp_logits) > 0.1


def test_fp8_weights_are_dequantized_block_by_block():
  import ml_dtypes

  q = np.ones((20, 40), ml_dtypes.float8_e4m3fn)
  q[17, 35] = 3.0
  scale = np.arange(1, 7, dtype=np.float32).reshape(2, 3)  # blocks of 16 x 16, the last ones cut
  out = dequantize_fp8({"a.weight": q, "a.weight_scale_inv": scale, "b": np.ones(2)}, (16, 16))
  assert set(out) == {"a.weight", "b"} and out["a.weight"].shape == (20, 40)
  w = np.asarray(out["a.weight"])
  assert w.dtype == ml_dtypes.bfloat16
  assert (w[0, 0], w[0, 16], w[0, 39], w[16, 0], w[17, 35]) == (1, 2, 3, 4, 3 * 6)
  with pytest.raises(ValueError, match=r"^x: tensor a.weight_scale_inv has shape \(1, 3\), "
                                       r"expected \(2, 3\) \(blocks of 16x16 over a.weight "
                                       r"\(20, 40\)\)$"):
    dequantize_fp8({"a.weight": q, "a.weight_scale_inv": scale[:1]}, (16, 16), "x")
  with pytest.raises(ValueError, match=r"FP8 tensors without their weight_scale_inv: "
                                       r"\['a.weight'\] \(1 in all\)"):
    dequantize_fp8({"a.weight": q})
  with pytest.raises(ValueError, match=r"c.weight_scale_inv has no FP8 matrix c.weight to scale"):
    dequantize_fp8({"c.weight": np.ones((2, 2), np.float32), "c.weight_scale_inv": scale})


def test_mtp_tensors_outside_deepseeks_layout_are_errors(v3_with_mtp, tmp_path):
  hf_model, directory, mtp = v3_with_mtp
  cfg = model_config_from_hf({**hf_model.config.to_dict(), "num_nextn_predict_layers": 1})
  main = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  params = params_from_hf(cfg, {**main, **mtp})
  assert sorted(params["mtp_layers_0"]) == ["eh_proj", "enorm", "hnorm", "input_layernorm", "mlp",
                                            "post_attention_layernorm", "self_attn", "shared_head"]
  copies = ("model.layers.2.embed_tokens.weight", "model.layers.2.shared_head.head.weight")
  without_copies = params_from_hf(cfg, {**main, **{k: v for k, v in mtp.items()
                                                   if k not in copies}})
  jax.tree_util.tree_map(np.testing.assert_array_equal, without_copies, params)
  with pytest.raises(ValueError, match=r"unexpected tensors in checkpoint: "
                                       r"\['model\.layers\.2\.mlp\.foo\.weight'\]"):
    params_from_hf(cfg, {**main, **mtp, "model.layers.2.mlp.foo.weight": np.ones(2)})
  bad = {**mtp, "model.layers.2.eh_proj.weight": np.ones((64, 64), np.float32)}
  with pytest.raises(ValueError, match=r"tensor model\.layers\.2\.eh_proj\.weight has shape "
                                       r"\(64, 64\), expected \(64, 128\)"):
    params_from_hf(cfg, {**main, **bad})
  partial = {k: v for k, v in mtp.items() if "enorm" not in k}
  with pytest.raises(ValueError, match=r"missing tensors in checkpoint: "
                                       r"\['model\.layers\.2\.enorm\.weight'\] \(1 in all\)"):
    params_from_hf(cfg, {**main, **partial})
  # A copy that is no copy: named, and the model's own tensor is used for both.
  changed = {**mtp, copies[1]: mtp[copies[1]] + 0.5}
  with pytest.raises(ValueError, match=r"model\.layers\.2\.shared_head\.head\.weight differs from "
                                       r"lm_head\.weight \(by up to 0\.5\): the MTP layer shares"):
    params_from_hf(cfg, {**main, **changed})
  notes = []
  shared = params_from_hf(cfg, {**main, **changed}, log=notes.append)
  assert len(notes) == 1 and notes[0].startswith("model.layers.2.shared_head.head.weight differs")
  jax.tree_util.tree_map(np.testing.assert_array_equal, shared, params)
  # Not announced by num_nextn_predict_layers, or past the announced layers: unexpected.
  no_mtp = model_config_from_hf({**hf_model.config.to_dict(), "num_nextn_predict_layers": 0})
  assert no_mtp.num_mtp_layers == 0
  with pytest.raises(ValueError, match=r"unexpected tensors in checkpoint: \['model\.layers\.2\."
                                       r".*\(22 in all\); model\.layers\.2\.\* follows the last "
                                       r"decoder layer: a multi-token-prediction layer, which "
                                       r"config.json must announce with num_nextn_predict_layers"):
    params_from_hf(no_mtp, {**main, **mtp})
  extra = {"model.layers.3.enorm.weight": np.ones(64, np.float32)}
  with pytest.raises(ValueError, match=r"unexpected tensors in checkpoint: "
                                       r"\['model\.layers\.3\.enorm\.weight'\] \(1 in all\); "
                                       r"model\.layers\.3\.\* follows"):
    params_from_hf(cfg, {**main, **mtp, **extra})
  # Announced, but dropped from the files (some redistributions do): loaded without, said so.
  from safetensors.torch import load_file, save_file

  dropped = tmp_path / "dropped"
  dropped.mkdir()
  kept = {}
  for f in directory.glob("*.safetensors"):
    kept.update({k: v for k, v in load_file(str(f)).items() if not k.startswith("model.layers.2.")})
  save_file(kept, str(dropped / "model.safetensors"))
  (dropped / "config.json").write_text((directory / "config.json").read_text())
  notes = []
  model, params = load_hf(dropped, log=notes.append)
  assert model.config.num_mtp_layers == 0 and "mtp_layers_0" not in params
  assert notes == ["config.json announces 1 multi-token-prediction layer(s) "
                   "(num_nextn_predict_layers) but the checkpoint holds no model.layers.2.* "
                   "tensor: loaded without them, so the model cannot draft for speculative "
                   "decoding"]


def test_dtype_aliases_and_refusals(v3_checkpoint):
  assert [dtype_name(d) for d in ("bf16", "BF16", "fp32", "f16", "half", jnp.bfloat16,
                                  np.float32)] == ["bfloat16", "bfloat16", "float32", "float16",
                                                   "float16", "bfloat16", "float32"]
  model, params = load_hf(v3_checkpoint, dtype="bf16")
  assert model.config.dtype == "bfloat16" and params["embed_tokens"].dtype == jnp.bfloat16
  for bad in ("bf8", np.int8, "float64"):
    with pytest.raises(ValueError, match=r"dtype=.* is not supported: allowed float32, bfloat16, "
                                         r"float16 \(or bf16, fp32, fp16\)"):
      load_hf(v3_checkpoint, dtype=bad)


def _rewrite(directory, tmp_path, edit):
  """A copy of the checkpoint with its tensors edited, as one safetensors file."""
  from safetensors.numpy import load_file, save_file

  out = tmp_path / "broken"
  out.mkdir(parents=True)
  tensors = {}
  for f in sorted(directory.glob("*.safetensors")):
    tensors.update(load_file(str(f)))
  edit(tensors)
  save_file(tensors, str(out / "model.safetensors"))
  (out / "config.json").write_text((directory / "config.json").read_text())
  return out


def test_broken_checkpoints_are_named(v3_checkpoint, tmp_path):
  directory = v3_checkpoint
  missing = _rewrite(directory, tmp_path / "a", lambda t: t.pop(
      "model.layers.1.self_attn.kv_b_proj.weight"))
  with pytest.raises(ValueError, match=r"missing tensors.*model\.layers\.1\.self_attn\.kv_b_proj"):
    load_hf(missing)
  wrong = _rewrite(directory, tmp_path / "b", lambda t: t.update(
      {"model.norm.weight": np.ones(3, np.float32)}))
  with pytest.raises(ValueError, match=r"tensor model\.norm\.weight has shape \(3,\), expected"):
    load_hf(wrong)
  extra = _rewrite(directory, tmp_path / "c", lambda t: t.update(
      {"model.layers.0.mlp.experts.0.w": np.ones(3, np.float32)}))
  with pytest.raises(ValueError, match=r"unexpected tensors.*model\.layers\.0\.mlp\.experts\.0\.w"):
    load_hf(extra)
  config = json.loads((directory / "config.json").read_text())
  (missing / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
  with pytest.raises(ValueError, match="model_type='gpt2' is not supported: allowed deepseek_v2, "
                                       "deepseek_v3, llama, qwen2, mistral"):
    load_hf(missing)
  with pytest.raises(ValueError, match="no config.json"):
    load_hf(tmp_path)


@pytest.mark.slow  # the V3-with-MTP load test covers the layer; this adds the CLI round
def test_convert_then_generate_with_the_checkpoints_tokenizer(v3_with_mtp, tmp_path):
  """`mla-jax convert` output runs in `mla-jax generate`, tokenizing text with tokenizer.json;
  the source is laid out as DeepSeek releases V3, and its MTP layer drafts for --speculative."""
  import subprocess
  import sys

  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {chr(ord("a") + i): i for i in range(26)} | {"[UNK]": 26, " ": 27}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
  source = tmp_path / "hf"
  source.mkdir()
  for f in v3_with_mtp[1].iterdir():
    (source / f.name).write_bytes(f.read_bytes())
  tokenizer.save(str(source / "tokenizer.json"))
  out = tmp_path / "converted"
  run = lambda *a: subprocess.run([sys.executable, "-m", "mla_jax.cli", *a],  # noqa: E731
                                  capture_output=True, text=True, timeout=300)
  converted = run("convert", "--from-hf", str(source), "--out", str(out))
  assert converted.returncode == 0, converted.stderr
  assert converted.stderr.splitlines() == [
      "dtype: float32 (config.json names no torch_dtype)"]  # --dtype auto says what it chose
  again = run("convert", "--from-hf", str(source), "--out", str(out))
  assert again.returncode == 2 and "already holds checkpoints" in again.stderr
  result = run("generate", "--checkpoint", str(out), "--prompt", "abc", "--max-new-tokens", "12",
               "--temperature", "0")
  assert result.returncode == 0, result.stderr
  assert "prefill: 3 tokens" in result.stderr and "decode: 11 tokens" in result.stderr
  speculative = run("generate", "--checkpoint", str(out), "--prompt", "abc", "--max-new-tokens",
                    "12", "--temperature", "0", "--speculative", "2")
  assert speculative.returncode == 0, speculative.stderr
  assert "speculative: 2 drafts per verify step; kept per draft position: " in speculative.stderr

  model, params = load_hf(source)  # the same greedy tokens, decoded by the same tokenizer
  ids = mla_jax.generate(model, params, [[0, 1, 2]], max_new_tokens=12)[0, 3:]
  expected = tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
  assert result.stdout == "abc" + expected + "\n"
  # --speculative prints when done, the whole row decoded at once: the same greedy tokens.
  whole = tokenizer.decode([0, 1, 2] + [int(i) for i in ids], skip_special_tokens=True)
  assert speculative.stdout == whole + "\n---\n"


def test_loading_onto_a_mesh_places_each_tensor_sharded(v3_checkpoint):
  from jax.sharding import PartitionSpec as P

  from mla_jax.sharding import make_mesh

  model, params = load_hf(v3_checkpoint)
  mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1, "sequence": 1})
  _, sharded = load_hf(v3_checkpoint, mesh=mesh)
  assert sharded["embed_tokens"].sharding.spec == P("tensor", "fsdp")
  assert {s.data.shape for s in sharded["embed_tokens"].addressable_shards} == {(97, 8)}
  experts = sharded["layers_1"]["mlp"]["experts_down_proj"]  # [E, I, D]: D split 8 ways
  assert {s.data.shape for s in experts.addressable_shards} == {(8, 32, 8)}
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 97, (2, 16)))
  expected, _ = model.apply({"params": params}, tokens)
  got, _ = jax.jit(lambda p, t: model.apply({"params": p}, t))(sharded, tokens)
  assert rel_err(got, expected) <= 1e-5
  with pytest.raises(ValueError, match=r"mesh\.tensor=2 does not divide dimension 0 \('vocab', "
                                       r"size 97\) of \['embed_tokens'\]"):
    load_hf(v3_checkpoint, mesh=make_mesh({"data": 1, "fsdp": 4, "tensor": 2, "sequence": 1}))


def test_bfloat16_and_sharded_safetensors_files_load(v3_checkpoint, tmp_path):
  """DeepSeek ships bfloat16 weights in several files with an index: both read as written."""
  from safetensors.torch import load_file, save_file

  tensors = {}
  for f in v3_checkpoint.glob("*.safetensors"):
    tensors.update(load_file(str(f)))
  names = sorted(tensors)
  halves = {"part-1.safetensors": names[::2], "part-2.safetensors": names[1::2]}
  out = tmp_path / "bf16"
  out.mkdir()
  for file, part in halves.items():
    save_file({n: tensors[n] if ".mlp.gate." in n else tensors[n].to(torch.bfloat16).contiguous()
               for n in part}, str(out / file))  # the router stays float32, as in V3's files
  index = {"weight_map": {n: file for file, part in halves.items() for n in part}}
  (out / "model.safetensors.index.json").write_text(json.dumps(index))
  (out / "config.json").write_text((v3_checkpoint / "config.json").read_text())
  _, params = load_hf(out, dtype=jnp.bfloat16)
  _, reference = load_hf(v3_checkpoint, dtype=jnp.bfloat16)  # float32 file, cast on load
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, reference)
  (out / "part-2.safetensors").unlink()
  with pytest.raises(ValueError, match=r"names shard files that are not there: \['part-2"):
    load_hf(out)
