"""Shared by the Hugging Face parity tests: the command that installs what they need (each test
module skips itself with it, so the skip names the module), a tiny transformers model built
from a config with weights that make mistakes show, and greedy generation on both sides with
the same settings. Imports neither PyTorch nor transformers until a function runs."""

from __future__ import annotations

import numpy as np

import mla_jax

# The README's test command does not install PyTorch (its default Linux wheel is a CUDA build of
# several GB); without it these tests are reported skipped with the command that adds them.
PARITY_INSTALL = ('pip install torch --index-url https://download.pytorch.org/whl/cpu && '
                  'pip install "transformers>=5.24,<6"')


def random_hf_model(family: str, **config):
  """transformers' `family`ForCausalLM (eager attention, eval mode) with larger-than-init weights
  and non-unit norms, so a misplaced tensor shows; a DeepSeek-V3 correction bias is drawn too."""
  import torch
  import transformers

  if family == "DeepseekV3":  # its config announces one MTP layer by default, which the model
    config.setdefault("num_nextn_predict_layers", 0)  # transformers builds does not hold
  hf_config = getattr(transformers, f"{family}Config")(**config)
  hf_config._attn_implementation = "eager"
  torch.manual_seed(0)
  model = getattr(transformers, f"{family}ForCausalLM")(hf_config).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in pname else 0.15 * torch.randn_like(p))
    for bname, b in model.named_buffers():
      if "e_score_correction_bias" in bname:
        b.copy_(0.3 * torch.randn_like(b))  # changes which experts are chosen, not their weights
  return model


def case_model(cases: dict, common: dict, name: str):
  """random_hf_model of a parity test's case: cases[name] is (family, config fields over common)."""
  family, extra = cases[name]
  return random_hf_model(family, **{**common, **extra})


def saved_case(cases: dict, common: dict, name: str, tmp_path_factory):
  """(name, live HF model, the directory transformers' save_pretrained wrote it to)."""
  hf_model = case_model(cases, common, name)
  directory = tmp_path_factory.mktemp(name)
  hf_model.save_pretrained(directory)
  return name, hf_model, directory


def assert_same_greedy_tokens(hf_model, model, params, prompt: np.ndarray, new_tokens: int):
  """transformers' and mla-jax's greedy continuations of prompt [B,T] are the same tokens (an
  explicit all-ones mask: id 0 is no padding here; no EOS on either side)."""
  import torch

  hf_model.generation_config.eos_token_id = None
  with torch.no_grad():
    expected = hf_model.generate(torch.as_tensor(prompt), attention_mask=torch.ones(prompt.shape),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0).numpy()
  ours = mla_jax.generate(model, params, prompt, attention_mask=np.ones_like(prompt),
                          max_new_tokens=new_tokens)
  np.testing.assert_array_equal(ours, expected)
