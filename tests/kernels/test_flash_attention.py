"""The Pallas flash-attention kernels (mla_jax/kernels/flash_attention*.py): in Pallas' interpret
mode on this CPU, outputs and gradients equal the JAX path's; and a whole training step that
uses each kernel lowers for TPU and for CUDA with jax.export (lowering needs no device), with
the kernels' custom calls and none of the JAX path's loops. Nothing here runs on a TPU or GPU."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mla_jax
from mla_jax.config.run import TrainConfig
from mla_jax.kernels import flash_attention as kernels
from mla_jax.layers.flash_attention import flash_attention
from mla_jax.train.step import TrainState, apply_gradients, compute_grads, make_optimizer
from tests.helpers import TINY_CONFIGS, flash_operands, rel_err, variant

TOL = 1e-5
TRITON = "__gpu$xla.gpu.triton"


# (B, T, S, H, G, K, V, R, cached): MLA's shapes (shared rope key, V != K) over 2 query and 3
# key blocks of the TPU kernel, ending mid-block; GQA without a rope term; queries into a cache
# at offsets 250 and 3, rows holding 287 and 30 keys, NaN in every slot past them, with two
# query heads reading one key/value group (so the default run checks the grouped backward's sum).
CASES = {"mla": (2, 200, 200, 2, 2, 16, 24, 8, False),
         "gqa": (1, 300, 300, 4, 2, 16, 12, 0, False),
         "mla_into_a_cache": (2, 37, 300, 2, 1, 16, 24, 8, True)}


# The interpreters run every program of the grid in turn: by default each kernel runs the case
# with MLA's shapes into a cache; the longer cases are slow-marked.
@pytest.mark.parametrize("platform,case", [
    ("gpu", "mla_into_a_cache"), ("tpu", "mla_into_a_cache"),
    pytest.param("gpu", "mla", marks=pytest.mark.slow),
    pytest.param("gpu", "gqa", marks=pytest.mark.slow),
    pytest.param("tpu", "mla", marks=pytest.mark.slow),
    pytest.param("tpu", "gqa", marks=pytest.mark.slow)])
def test_kernel_in_interpret_mode_equals_the_jax_path(platform, case):
  b, t, s, h, g, k_dim, v_dim, r, cached = CASES[case]
  q, k, v, q_rope, k_rope = flash_operands(b, t, s, h, g, k_dim, v_dim, r)
  offsets = lengths = None
  real = jnp.ones((b, t), bool)
  if cached:
    offsets, lengths = jnp.array([250, 3]), jnp.array([287, 30])
    real = jnp.arange(t)[None, :] < (lengths - offsets)[:, None]
    empty = jnp.arange(s)[None, :] >= lengths[:, None]
    poison = lambda x: jnp.where(empty.reshape(empty.shape + (1,) * (x.ndim - 2)), jnp.nan, x)  # noqa
    k, v, k_rope = poison(k), poison(v), poison(k_rope)
  weights = jax.random.normal(jax.random.key(1), (b, t, h, v_dim))

  def attend(implementation):
    def f(q, k, v, q_rope, k_rope):
      return flash_attention(q, k, v, q_rope=q_rope, k_rope=k_rope, scale=0.3,
                             query_offsets=offsets, kv_lengths=lengths, block_q=64, block_k=32,
                             implementation=implementation, interpret=True)
    return f

  def loss(f):
    return lambda *xs: jnp.sum(jnp.where(real[:, :, None, None], f(*xs) * weights, 0.0))

  argnums = (0, 1, 2, 3, 4) if r else (0, 1, 2)
  kernel, reference = attend(f"pallas_{platform}"), attend("xla")
  out = jax.jit(kernel)(q, k, v, q_rope, k_rope)
  assert bool(jnp.all(jnp.isfinite(out)))
  mask = real[:, :, None, None]
  assert rel_err(jnp.where(mask, out, 0), jnp.where(mask, reference(q, k, v, q_rope, k_rope), 0)
                 ) <= TOL
  got = jax.jit(jax.grad(loss(kernel), argnums))(q, k, v, q_rope, k_rope)
  want = jax.grad(loss(reference), argnums)(q, k, v, q_rope, k_rope)
  for name, a, e in zip(("q", "k", "v", "q_rope", "k_rope"), got, want):
    finite = jnp.isfinite(e)  # the reference's gradient is NaN on the poisoned slots
    assert bool(jnp.all(jnp.where(finite, jnp.isfinite(a), True))), name
    assert rel_err(jnp.where(finite, a, 0), jnp.where(finite, e, 0)) <= TOL, name


def test_which_operands_each_kernel_takes():
  q, k, v, q_rope, _ = flash_operands(1, 8, 8, 2, 2, 192, 128, 64)
  assert not kernels.supports("tpu", q, k, v, None)  # 192: neither below 128 nor a multiple
  assert kernels.supports("tpu", q[..., :128], k[..., :128], v, q_rope)  # MLA's split: 128 + 64
  assert kernels.supports("gpu", q, k, v, None)  # padded to 256
  assert not kernels.supports("gpu", jnp.zeros((1, 8, 2, 300)), jnp.zeros((1, 8, 2, 300)), v, None)
  with pytest.raises(ValueError, match="implementation='cudnn' is invalid"):
    flash_attention(q, k, v, scale=1.0, implementation="cudnn")
  # A kernel named explicitly refuses operands it does not take, instead of failing inside it.
  for implementation, operands in (("pallas_tpu", (q, k, v)),  # keys of 192
                                   ("pallas_tpu", (q[..., :0], k[..., :0], v)),  # zero width
                                   ("pallas_tpu", (q[..., :128].astype(jnp.float16),
                                                   k[..., :128].astype(jnp.float16),
                                                   v.astype(jnp.float16)))):
    with pytest.raises(ValueError, match=rf"implementation='{implementation}' does not take "
                                         r"these operands .*'auto' falls back"):
      flash_attention(*operands, scale=1.0, implementation=implementation, interpret=True)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_zero_width_keys_fall_back_to_the_jax_path_when_lowered_for(platform):
  """MLA with qk_nope_head_dim = 0 (RoPE on every key feature) passes flash attention keys of
  width 0: no kernel takes them (the TPU kernel failed to lower, both failed in interpret
  mode), so the program lowered for a TPU or a GPU runs the JAX path, and it equals dense."""
  q, k, v, q_rope, k_rope = flash_operands(1, 40, 40, 2, 2, 0, 16, 8)
  assert not kernels.supports("tpu", q, k, v, q_rope) and not kernels.supports("gpu", q, k, v,
                                                                                q_rope)
  attend = lambda *xs: flash_attention(*xs[:3], q_rope=xs[3], k_rope=xs[4], scale=0.3,  # noqa
                                       block_q=16, block_k=16)
  text = jax.export.export(jax.jit(attend), platforms=[platform])(
      q, k, v, q_rope, k_rope).mlir_module()
  assert "custom_call" not in text and "stablehlo.while" in text  # the JAX path's loops
  scores = jnp.einsum("bthr,bsr->bhts", q_rope, k_rope) * 0.3  # the rope term is the score
  scores = jnp.where(jnp.tril(jnp.ones((40, 40), bool)), scores, -jnp.inf)
  dense = jnp.einsum("bhts,bshv->bthv", jax.nn.softmax(scores, axis=-1), v)
  np.testing.assert_allclose(attend(q, k, v, q_rope, k_rope), dense, rtol=1e-5, atol=1e-6)


# --- A whole training step, lowered for a TPU and a GPU ---------------------------------------

LOWERED = {
    "mla": variant(TINY_CONFIGS["q_lora_yarn_5_heads"], num_layers=2, max_seq_len=512),
    "mqa": variant(TINY_CONFIGS["q_lora"], attention="mqa", num_layers=1, max_seq_len=512),
}


def _train_step_text(config, platform: str, dtype: str) -> str:
  """The MLIR of one AdamW training step at T = 512 with flash attention, exported for
  `platform` ('tpu' or 'cuda') from this CPU."""
  config = dataclasses.replace(config, dtype=dtype)
  model = mla_jax.Transformer(config)
  optimizer, schedule = make_optimizer(TrainConfig(steps=10))
  tokens = jax.ShapeDtypeStruct((2, 512), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
  state = jax.eval_shape(lambda p: TrainState(step=jnp.int32(0), params=p,
                                              opt_state=optimizer.init(p)), params)

  def step(state, inputs, targets):
    loss, grads, _ = compute_grads(model, state.params, inputs, targets, "flash_attention")
    return apply_gradients(optimizer, schedule, state, loss, grads)

  exported = jax.export.export(
      jax.jit(step), platforms=[platform],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(state, tokens, tokens)
  return exported.mlir_module()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name,dtype", [("mla", "bfloat16"), ("mla", "float32"),
                                        ("mqa", "bfloat16")])
def test_training_step_with_the_kernel_lowers_for(platform, name, dtype):
  text = _train_step_text(LOWERED[name], platform, dtype)
  layers = LOWERED[name].num_layers
  calls = "tpu_custom_call" if platform == "tpu" else TRITON
  kernel_calls = [line for line in text.splitlines() if calls in line and "custom_call" in line]
  assert len(kernel_calls) == 3 * layers  # forward, dK/dV and dQ per layer
  for kernel in ("mla_flash_attention_fwd", "mla_flash_attention_dkv", "mla_flash_attention_dq"):
    assert text.count(kernel) >= layers, kernel
  assert "stablehlo.while" not in text  # the JAX path's block loops are not in the program
