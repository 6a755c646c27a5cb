"""GQA -> MLA conversion of a model (mla_jax/conversion/convert.py): exact where the math says it
is (every RoPE pair kept, a latent of the hidden size), an error that grows smoothly as the rank
falls, and what each part of the report says."""

import numpy as np
import pytest

from mla_jax.conversion import calibrate, convert_params
from tests.conversion.helpers import GQA, TOKENS, logits, source, variant

WINDOWS = np.random.default_rng(1).integers(0, 97, (16, 64))


@pytest.fixture(scope="module")
def gqa():
  model, params = source()
  return params, logits(GQA, params), calibrate(GQA, params, WINDOWS)


@pytest.mark.parametrize("method", ["mha2mla", "transmla"])
@pytest.mark.parametrize("calibrated", [False, True], ids=["weight_only", "calibrated"])
def test_every_pair_kept_at_full_rank_is_exact(gqa, method, calibrated):
  """k_rope = 2 RoPE keys of 16 (one per kv head: qk_rope_groups=2), latent 64 = hidden size =
  the keys' no-RoPE part and values' width: logits equal the source's, on every attention path."""
  params, expected, stats = gqa
  target, converted, report = convert_params(GQA, params, 64, 32, method,
                                             stats if calibrated else None)
  assert (target.attention, target.kv_lora_rank, target.qk_rope_head_dim) == ("mla", 64, 32)
  assert (target.qk_rope_groups, target.qk_nope_head_dim, target.rope_theta) == (2, 16, 1e4)
  for row in report["layers"]:
    assert row["kv_energy_kept"] == pytest.approx(1.0, abs=1e-12)
    assert row["rope_kept"] == pytest.approx(1.0, abs=1e-12)
  for impl in ("naive", "absorbed"):
    assert np.abs(logits(target, converted, impl) - expected).max() <= 1e-4, impl


@pytest.mark.parametrize("config", [
    variant(attention="mqa", num_kv_heads=None, num_heads=2, v_head_dim=48),  # one RoPE key:
    # DeepSeek-shaped (qk_rope_groups=1), 16 + 48 = 64 wide
    variant(qk_nope_head_dim=0, qk_rope_head_dim=32, rope_interleave=False),  # Llama's heads
], ids=["mqa_one_shared_key", "llama_heads_all_rope"])
def test_exact_for_other_head_shapes(config):
  _, params = source(config)
  width = config.kv_heads * config.qk_rope_head_dim
  target, converted, _ = convert_params(config, params, 64, width, "transmla")
  assert target.qk_rope_groups == config.kv_heads
  assert target.qk_nope_head_dim == config.qk_nope_head_dim
  assert target.rope_interleave == config.rope_interleave
  assert np.abs(logits(target, converted) - logits(config, params)).max() <= 1e-4


def test_error_grows_smoothly_as_the_rank_falls(gqa):
  """From the exact conversion down to a latent of 8, the logit error grows at every step, and
  stays within the square root of the share of energy the latent drops: no cliff anywhere."""
  params, expected, stats = gqa
  errors, dropped = [], []
  for rank in (64, 56, 48, 40, 32, 24, 16, 8):
    target, converted, report = convert_params(GQA, params, rank, 32, "transmla", stats)
    errors.append(float(np.abs(logits(target, converted) - expected).max()))
    dropped.append(1 - min(row["kv_energy_kept"] for row in report["layers"]))
  assert errors[0] <= 1e-4
  assert all(later > earlier for earlier, later in zip(errors, errors[1:])), errors
  assert all(e <= np.sqrt(d) for e, d in zip(errors[1:], dropped[1:])), (errors, dropped)
  assert dropped == sorted(dropped) and dropped[0] < 1e-12 < dropped[1]


def test_fewer_rope_features_drop_rotation_and_the_cache(gqa):
  """One shared key of 16 (DeepSeek's layout) over 2 kv heads: RoPE kept only in part, what is
  left of each head's rotated key joins the no-RoPE part; the cache shrinks to a third."""
  params, expected, stats = gqa
  target, converted, report = convert_params(GQA, params, 16, 16, "mha2mla", stats)
  assert (target.qk_rope_groups, target.qk_nope_head_dim) == (1, 16 + 16)
  assert report["cache_elements_per_token_per_layer"] == {"source": 2 * (32 + 16),
                                                          "target": 16 + 16}
  assert report["cache_reduction"] == pytest.approx(1 - 32 / 96)
  for row in report["layers"]:
    assert 0.3 < row["rope_kept"] < 0.8 and 0 < row["kv_energy_kept"] < 1
  error = np.abs(logits(target, converted) - expected).max()
  assert 1e-2 < error < np.abs(expected).max()  # an approximation, finite and not exact
