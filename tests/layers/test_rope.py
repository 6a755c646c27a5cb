import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.config import ModelConfig
from mla_jax.layers.rope import apply_rope, rope_cos_sin, rope_inv_freq

R = 8


def _config(**kw) -> ModelConfig:
  return ModelConfig(qk_rope_head_dim=R, **kw)


def _rotate(x, positions, cfg, interleave):
  cos, sin = rope_cos_sin(positions, cfg)
  return apply_rope(x, cos, sin, interleave)


def test_plain_frequencies():
  np.testing.assert_allclose(rope_inv_freq(_config(rope_theta=10000.0)),
                             [1.0, 0.1, 0.01, 0.001], rtol=1e-6)


def test_rope_groups_repeat_one_keys_frequencies():
  """qk_rope_groups=2: R = 16 features are two RoPE keys of 8, each at the frequencies a key of
  8 has; rotating the concatenation rotates each group as a key of 8 on its own."""
  grouped = ModelConfig(qk_rope_head_dim=2 * R, qk_rope_groups=2, rope_theta=100.0)
  one = _config(rope_theta=100.0)
  np.testing.assert_allclose(rope_inv_freq(grouped), [1.0, 0.1 ** 0.5, 0.1, 0.1 ** 1.5] * 2,
                             rtol=1e-6)
  x = jax.random.normal(jax.random.key(2), (1, 3, 2, 2 * R))
  positions = jnp.array([[0, 4, 11]])
  both = _rotate(x, positions, grouped, interleave=True)
  for g in range(2):
    np.testing.assert_allclose(both[..., g * R:(g + 1) * R],
                               _rotate(x[..., g * R:(g + 1) * R], positions, one, True), atol=1e-6)


def test_interleaved_rotates_adjacent_pairs_by_position_times_frequency():
  x = jnp.zeros((1, 1, 1, R)).at[..., 2].set(1.0)  # unit vector on the first axis of pair 1
  out = _rotate(x, jnp.array([[3]]), _config(), interleave=True)[0, 0, 0]
  angle = 3 * 0.1  # pair 1 has inv_freq 0.1
  expected = np.zeros(R)
  expected[2], expected[3] = math.cos(angle), math.sin(angle)
  np.testing.assert_allclose(out, expected, atol=1e-6)


def test_half_layout_rotates_i_with_i_plus_half():
  x = jnp.zeros((1, 1, 1, R)).at[..., 1].set(1.0)  # feature 1 pairs with feature 1 + R/2 = 5
  out = _rotate(x, jnp.array([[3]]), _config(), interleave=False)[0, 0, 0]
  expected = np.zeros(R)
  expected[1], expected[5] = math.cos(0.3), math.sin(0.3)
  np.testing.assert_allclose(out, expected, atol=1e-6)


def test_layouts_differ_by_a_fixed_permutation():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, R))
  positions = jnp.arange(5)[None].repeat(2, 0) + jnp.array([[0], [7]])
  perm = np.concatenate([np.arange(0, R, 2), np.arange(1, R, 2)])  # interleaved -> half layout
  via_half = _rotate(x[..., perm], positions, _config(), interleave=False)
  via_interleaved = _rotate(x, positions, _config(), interleave=True)
  np.testing.assert_allclose(via_interleaved[..., perm], via_half, atol=1e-6)


@pytest.mark.parametrize("interleave", [True, False])
def test_scores_depend_only_on_relative_position(interleave):
  cfg = _config()
  q, k = jax.random.normal(jax.random.key(1), (2, 1, 1, 1, R))
  def score(m, n):
    return float(jnp.sum(_rotate(q, jnp.array([[m]]), cfg, interleave)
                         * _rotate(k, jnp.array([[n]]), cfg, interleave)))
  assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-5)
  assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)
  # A rotation keeps the norm.
  np.testing.assert_allclose(jnp.linalg.norm(_rotate(q, jnp.array([[9]]), cfg, interleave)),
                             jnp.linalg.norm(q), rtol=1e-6)


def test_yarn_frequencies_blend_between_original_and_interpolated():
  yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 4.0,
          "beta_slow": 1.0}
  cfg = _config(rope_theta=100.0, rope_scaling=yarn)
  # R=8, base 100: correction dims floor(8 ln(64/(4*2pi))/(2 ln 100)) = 0 and
  # ceil(8 ln(64/(2pi))/(2 ln 100)) = 3, so the ramp over the 4 frequencies is [0, 1/3, 2/3, 1].
  original = 1.0 / 100.0 ** (np.arange(0, R, 2) / R)
  ramp = np.array([0.0, 1 / 3, 2 / 3, 1.0])
  expected = original / 4.0 * ramp + original * (1 - ramp)
  np.testing.assert_allclose(rope_inv_freq(cfg), expected, rtol=1e-6)
  # The fastest-rotating feature is left as it was; the slowest is fully interpolated.
  assert rope_inv_freq(cfg)[0] == pytest.approx(1.0)
  assert rope_inv_freq(cfg)[-1] == pytest.approx(original[-1] / 4)


def test_yarn_attention_factor_scales_cos_and_sin():
  yarn = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "mscale": 1.0,
          "mscale_all_dim": 0.0}
  cos, sin = rope_cos_sin(jnp.array([[0, 5]]), _config(rope_scaling=yarn))
  factor = 0.1 * math.log(40.0) + 1.0
  np.testing.assert_allclose(cos[0, 0], np.full(R // 2, factor), rtol=1e-6)
  np.testing.assert_allclose(cos[0, 1] ** 2 + sin[0, 1] ** 2, np.full(R // 2, factor**2), rtol=1e-5)


def test_bf16_input_keeps_dtype():
  x = jnp.ones((1, 2, 1, R), jnp.bfloat16)
  assert _rotate(x, jnp.array([[0, 1]]), _config(), True).dtype == jnp.bfloat16
