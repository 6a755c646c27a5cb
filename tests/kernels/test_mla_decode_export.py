"""A whole decode step with the Pallas kernel lowers for TPU and for CUDA on this CPU machine
(jax.export needs no device): block shapes, tiling, dtypes and the kernels' Python-side lowering
are checked, and the exported module holds the kernel's custom call (Mosaic's tpu_custom_call,
Triton's __gpu$xla.gpu.triton) instead of XLA's flash-decoding loop. DeepSeek-V2-Lite's attention
shapes (16 heads, latent 512 + RoPE 64), one layer, bfloat16, abstract arrays: nothing is
allocated."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from mla_jax.config import ModelConfig
from mla_jax.kernels.mla_decode import kernel_platform
from mla_jax.kinds import absorbed_weights, init_cache, init_paged_cache
from mla_jax.model import Transformer
from mla_jax.sampling import Sampler, decode_step

TRITON = "__gpu$xla.gpu.triton"
CUSTOM_CALL = {"tpu": "tpu_custom_call", "gpu": TRITON}
EXPORT_PLATFORM = {"tpu": "tpu", "gpu": "cuda"}
BATCH, SLOTS, PAGE = 4, 2048, 64


def _config(cache_dtype: str, heads: int = 16) -> ModelConfig:
  return ModelConfig(vocab_size=1024, hidden_size=2048, num_layers=1, num_heads=heads,
                     q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                     qk_rope_head_dim=64, v_head_dim=128, intermediate_size=1024,
                     max_seq_len=SLOTS, dtype="bfloat16", param_dtype="bfloat16",
                     cache_dtype=cache_dtype, decode_kernel="pallas", decode_kv_splits=2)


def _exported_text(platform: str, cache_dtype: str, paged: bool, heads: int = 16,
                   tokens: int = 1) -> str:
  cfg = _config(cache_dtype, heads)
  model = Transformer(cfg)
  params = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  absorbed = jax.eval_shape(functools.partial(absorbed_weights, cfg), params)
  token = jax.ShapeDtypeStruct((BATCH,), jnp.int32)
  if paged:  # the serving engine's step: the model over a paged cache, `tokens` new per row
    cache = jax.eval_shape(lambda: init_paged_cache(cfg, BATCH * SLOTS // PAGE, PAGE, BATCH,
                                                    SLOTS // PAGE))

    def step(params, absorbed, cache, new):
      return model.apply({"params": params, "absorbed": absorbed}, new, cache=cache)

    args = (params, absorbed, cache, jax.ShapeDtypeStruct((BATCH, tokens), jnp.int32))
  else:  # generate's decode step
    cache = jax.eval_shape(lambda: init_cache(cfg, BATCH, SLOTS))
    step = functools.partial(decode_step, model=model, sampler=Sampler())
    args = (params, token, cache, jax.eval_shape(lambda: jax.random.key(0)), absorbed)
  with kernel_platform(platform):
    exported = jax.export.export(
        jax.jit(step), platforms=[EXPORT_PLATFORM[platform]],
        # Triton calls carry no compatibility guarantee across JAX versions: allowed here.
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
  return exported.mlir_module()


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("cache_dtype", ["bfloat16", "int8", "int4"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_decode_step_lowers_with_the_kernel(platform, cache_dtype, paged):
  text = _exported_text(platform, cache_dtype, paged)
  assert f"custom_call @{CUSTOM_CALL[platform]}" in text
  name = "mla_decode_paged" if paged else "mla_decode"
  assert f'"{name}"' in text  # the kernel's own name (kernel_name / the Triton function name)
  assert "stablehlo.while" not in text  # XLA's flash-decoding loop is gone


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_deepseek_v2_heads_with_four_new_tokens_lower(platform):
  """128 heads x 4 new tokens (speculative verification): 512 query rows, one TPU program's
  worth, 16 GPU row blocks."""
  text = _exported_text(platform, "bfloat16", paged=True, heads=128, tokens=4)
  assert f"custom_call @{CUSTOM_CALL[platform]}" in text and '"mla_decode_paged"' in text
