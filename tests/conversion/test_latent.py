"""The joint factorization through the latent (mla_jax/conversion/latent.py): what it keeps, its
energy figure, the latent norm's scale, and its refusals."""

import numpy as np
import pytest

from mla_jax.conversion.latent import factor_latent

D, M = 24, 16


def _case(seed=0):
  rng = np.random.default_rng(seed)
  m_x = rng.normal(size=(D, M)) @ np.diag(np.linspace(3, 0.1, M))  # a spread of strengths
  g = 1 + 0.3 * rng.random(D)  # the block norm's scale
  u = rng.normal(size=(500, D)) @ np.diag(np.linspace(2, 0.2, D))
  u *= np.sqrt(D) / np.linalg.norm(u, axis=1, keepdims=True)  # |u|^2 = D, as RMSNorm leaves it
  return m_x, g, u * g  # x = g * u


def _through_latent(latent, x, eps=1e-6):
  c = x @ latent.down
  normed = latent.norm_scale * c / np.sqrt(np.mean(c**2, axis=-1, keepdims=True) + eps)
  return normed @ latent.up


@pytest.mark.parametrize("calibrated", [False, True], ids=["weight_only", "calibrated"])
def test_a_latent_of_the_hidden_size_is_exact(calibrated):
  m_x, g, x = _case()
  latent = factor_latent(m_x, g, D, x.T @ x / len(x) if calibrated else None)
  assert latent.energy_kept == pytest.approx(1.0, abs=1e-12)
  np.testing.assert_allclose(_through_latent(latent, x), x @ m_x, rtol=0, atol=1e-5)


def test_a_latent_of_the_maps_rank_reconstructs_it_before_the_norm():
  """C = M >= rank: x -> c -> up is the map itself; only the norm's per-token scale remains."""
  m_x, g, x = _case()
  latent = factor_latent(m_x, g, M, None)
  np.testing.assert_allclose((x @ latent.down) @ latent.up, x @ m_x, atol=1e-9)
  np.testing.assert_allclose(latent.down.T @ np.diag(g**2) @ latent.down, np.eye(M), atol=1e-9)


def test_energy_kept_is_the_share_of_the_singular_values():
  m_x, g, x = _case()
  cov = x.T @ x / len(x)
  for rank in (4, 8, 12):
    weight_only = factor_latent(m_x, g, rank, None)
    s = np.linalg.svd(g[:, None] * m_x, compute_uv=False)
    assert weight_only.energy_kept == pytest.approx((s[:rank]**2).sum() / (s**2).sum())
    calibrated = factor_latent(m_x, g, rank, cov)
    # the calibrated latent reconstructs the calibration tokens' keys and values better
    def before_norm(latent):
      return np.linalg.norm((x @ latent.down) @ latent.up - x @ m_x)
    assert before_norm(calibrated) < before_norm(weight_only)


def test_norm_scale_is_the_latents_rms_on_calibration_tokens():
  m_x, g, x = _case()
  latent = factor_latent(m_x, g, 8, x.T @ x / len(x))
  c = x @ latent.down
  assert latent.norm_scale == pytest.approx(np.sqrt(np.mean(c**2) + 1e-6), rel=1e-9)
  assert factor_latent(m_x, g, 8, None).norm_scale == pytest.approx(np.sqrt(1 + 1e-6))


def test_refusals():
  m_x, g, _ = _case()
  with pytest.raises(ValueError, match=r"kv_lora_rank 25 must be in \[1, 24\]"):
    factor_latent(m_x, g, 25)
  g[3] = 0.0
  with pytest.raises(ValueError, match=r"input_layernorm has 1 zero scales"):
    factor_latent(m_x, g, 8)
