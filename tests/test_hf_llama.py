"""Llama, Qwen2 and Mistral checkpoints into the MHA/GQA/MQA baseline attention: logits and
greedy tokens equal transformers' (PyTorch, CPU), on tiny random models built here."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import mla_jax
from mla_jax.hf import load_hf
from mla_jax.hf.llama import llama_config_from_hf

from tests.hf_parity import PARITY_INSTALL, assert_same_greedy_tokens, case_model, saved_case

torch = pytest.importorskip("torch", reason=f"Hugging Face parity tests need PyTorch: {PARITY_INSTALL}")
transformers = pytest.importorskip(
    "transformers", reason=f"Hugging Face parity tests need transformers: {PARITY_INSTALL}")

COMMON = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5)

CASES = {
    # GQA with a head_dim that is not hidden / heads, and a non-default rope theta.
    "llama_gqa": ("Llama", dict(num_key_value_heads=2, head_dim=24,
                                rope_parameters={"rope_type": "default", "rope_theta": 5000.0})),
    # q/k/v biases, tied embeddings, MQA.
    "qwen2_mqa_tied_bias": ("Qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True,
                                          rope_parameters={"rope_type": "default",
                                                           "rope_theta": 1e6})),
    # A sliding window shorter than max_position_embeddings: max_seq_len is capped at it.
    "mistral_mha_window": ("Mistral", dict(num_key_value_heads=4, sliding_window=64)),
}


def _hf_model(name):
  return case_model(CASES, COMMON, name)


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
  return saved_case(CASES, COMMON, request.param, tmp_path_factory)


def test_logits_and_greedy_tokens_match_transformers(saved):
  name, hf_model, directory = saved
  notes = []
  model, params = load_hf(directory, log=notes.append)
  cfg = model.config
  family = name.split("_")[0]
  assert cfg.attention == {"llama": "gqa", "qwen2": "mqa", "mistral": "mha"}[family]
  assert (cfg.qk_nope_head_dim, cfg.rope_interleave, cfg.qkv_bias) == (0, False,
                                                                        family == "qwen2")
  assert cfg.max_seq_len == (64 if family == "mistral" else 128)
  assert any("tie_word_embeddings" in n for n in notes) == (family == "qwen2")
  tokens = np.random.default_rng(0).integers(0, 101, (2, 48))
  with torch.no_grad():
    expected = hf_model(torch.as_tensor(tokens)).logits.numpy()
  logits, _ = model.apply({"params": params}, jnp.asarray(tokens))
  assert np.abs(np.asarray(logits) - expected).max() <= 1e-4

  assert_same_greedy_tokens(hf_model, model, params, tokens[:, :6], 40)


def test_unsupported_options_are_named():
  base = {**COMMON, "model_type": "llama", "num_key_value_heads": 2}
  cases = {
      "rope_parameters": ({"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0},
                          r"RoPE scaling 'llama3' is not supported for llama: allowed default"),
      "attention_bias": (True, r"attention_bias=True is not supported: mla-jax's baseline has "
                               r"no o_proj bias"),
      "hidden_act": ("gelu", r"hidden_act='gelu' is not supported"),
      "num_hidden_layers": ("2", r"num_hidden_layers='2' is invalid: expected int"),
  }
  for field, (value, message) in cases.items():
    with pytest.raises(ValueError, match=r"^config\.json: " + message):
      llama_config_from_hf({**base, field: value})


def test_convert_writes_a_workdir_that_generates(tmp_path):
  """`mla-jax convert` takes a Llama-family directory too; the workdir generates the same
  greedy tokens as load_hf."""
  from mla_jax.cli import main

  directory = tmp_path / "hf"
  _hf_model("llama_gqa").save_pretrained(directory)
  out = tmp_path / "w"
  assert main(["convert", "--from-hf", str(directory), "--out", str(out)]) == 0
  run = mla_jax.load_run(out)
  model, params = load_hf(directory)
  prompt = [[5, 6, 7]]
  expected = mla_jax.generate(model, params, prompt, max_new_tokens=8)
  np.testing.assert_array_equal(mla_jax.generate(run.model, run.params, prompt,
                                                 max_new_tokens=8), expected)
  assert json.loads((out / "special_tokens.json").read_text())["eos_token_id"] == 2
