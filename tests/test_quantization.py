"""int8/int4 latent quantization: round-trip bounds, packing, zero rows, extremes, no NaN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.cache import QMAX, dequantize, dequantize_planes, latent_planes, quantize


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_round_trip_error_is_at_most_half_a_step(kind):
  x = jax.random.normal(jax.random.key(0), (3, 5, 64)) * jnp.array([1e-3, 1.0, 40.0])[:, None, None]
  values, scale = quantize(x, kind)
  assert scale.shape == (3, 5, 1) and scale.dtype == jnp.float32
  assert values.dtype == (jnp.int8 if kind == "int8" else jnp.uint8)
  assert values.shape == ((3, 5, 64) if kind == "int8" else (3, 5, 32))  # int4: two per byte
  back = dequantize(values, scale)
  step = np.asarray(jnp.max(jnp.abs(x), -1, keepdims=True)) / QMAX[kind]
  assert (np.abs(np.asarray(back - x)) <= 0.5 * step * (1 + 1e-6)).all()
  # The largest magnitude of each row comes back exactly (it defines the scale).
  i = jnp.argmax(jnp.abs(x), -1, keepdims=True)
  np.testing.assert_allclose(jnp.take_along_axis(back, i, -1), jnp.take_along_axis(x, i, -1),
                             rtol=1e-6)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_zero_rows_extremes_and_every_code_survive(kind):
  qmax = QMAX[kind]
  rows = jnp.stack([
      jnp.zeros(16),  # all zero: scale must not be 0 (no 0/0)
      jnp.full(16, 3.0e38),  # near float32's max: no overflow to inf
      jnp.full(16, -1e-30),  # tiny (scale ~1e-32 stays a normal float)
      jnp.arange(-8, 8, dtype=jnp.float32) / 8 * qmax,  # hits every code incl. both ends
  ])
  values, scale = quantize(rows, kind)
  assert np.isfinite(np.asarray(scale)).all() and (np.asarray(scale) > 0).all()
  back = np.asarray(dequantize(values, scale))
  assert np.isfinite(back).all()
  np.testing.assert_array_equal(back[0], 0.0)
  np.testing.assert_allclose(back[1], 3.0e38, rtol=1e-6)
  np.testing.assert_allclose(back[2], -1e-30, rtol=1e-6)
  codes = np.round(np.arange(-8, 8) / 8 * qmax)
  np.testing.assert_allclose(back[3], np.clip(codes, -qmax, qmax), rtol=1e-6, atol=1e-6)


def test_int4_packs_element_pairs_into_nibbles():
  x = jnp.array([[1.0, -7.0, 7.0, 0.0, -1.0, 2.0]]) * (7 / 7)
  values, scale = quantize(x, "int4")
  assert float(scale[0, 0]) == 1.0
  # (1, -7) -> 0x1 | 0x9 << 4; (7, 0) -> 0x07; (-1, 2) -> 0xF | 0x2 << 4
  np.testing.assert_array_equal(values[0], [0x91, 0x07, 0x2F])
  np.testing.assert_array_equal(dequantize(values, scale), x)
  # As planes (what a kernel decodes without interleaving lanes): even and odd elements.
  even, odd = dequantize_planes(values, scale)
  np.testing.assert_array_equal(even[0], [1.0, 7.0, -1.0])
  np.testing.assert_array_equal(odd[0], [-7.0, 0.0, 2.0])
  assert latent_planes(values.dtype) == 2 and latent_planes(jnp.int8) == 1


def test_bad_kinds_are_refused():
  with pytest.raises(ValueError, match="kind='int2'"):
    quantize(jnp.zeros((1, 4)), "int2")
  with pytest.raises(ValueError, match="kv_lora_rank=5 must be even"):
    quantize(jnp.zeros((1, 5)), "int4")


def test_per_token_vs_per_group_scales_error_figures():
  """The figures behind one scale per token (mla_jax/cache.py, README): relative RMS
  round-trip error on Gaussian latents of width 512, per token vs per group of 32."""
  x = jax.random.normal(jax.random.key(0), (1024, 512))

  def error(kind, group):
    values, scale = quantize(x.reshape(1024, 512 // group, group), kind)
    back = dequantize(values, scale).reshape(x.shape)
    return float(jnp.sqrt(jnp.mean((back - x) ** 2) / jnp.mean(x ** 2)))

  assert error("int4", 512) == pytest.approx(0.135, abs=0.003)
  assert error("int4", 32) == pytest.approx(0.097, abs=0.003)
  assert error("int8", 512) == pytest.approx(0.0074, abs=0.0003)
