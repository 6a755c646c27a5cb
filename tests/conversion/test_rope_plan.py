"""Which RoPE pairs keep their rotation (mla_jax/conversion/rope_plan.py): the widths allowed, the
frequency grid DeepSeek's RoPE can express, and each method's choice on statistics built here
so the right answer is known."""

import numpy as np
import pytest

from mla_jax.conversion.rope_plan import LayerRopeStats, pair_features, plan_rope, rope_layout
from tests.conversion.helpers import GQA, variant


def test_rope_widths_allowed_and_refused():
  assert rope_layout(GQA, 16) == (1, 8)  # one key of one kv head's width: all 8 pairs
  assert rope_layout(GQA, 6) == (1, 3)
  assert rope_layout(GQA, 32) == (2, 8)  # whole keys above it: one per kv head
  refusals = {
      7: r"^--rope-dim 7 does not divide into RoPE pairs: give a positive even number",
      0: r"^--rope-dim 0 does not divide into RoPE pairs",
      48: r"^--rope-dim 48 is larger than possible: the source's 2 kv heads hold 2 x 16 = 32 "
          r"RoPE features per token$",
      24: r"^--rope-dim 24: above one kv head's RoPE width \(16\) k_rope holds whole RoPE keys, "
          r"one per kv head kept: a multiple of 16 up to 32$",
  }
  for width, message in refusals.items():
    with pytest.raises(ValueError, match=message):
      rope_layout(GQA, width)


def test_pair_features_in_both_layouts():
  assert pair_features(16, 16, 3, True).tolist() == [22, 23]
  assert pair_features(16, 16, 3, False).tolist() == [19, 27]


def _stats(contribution, covariance=None):
  g, p = contribution.shape
  if covariance is None:
    covariance = np.stack([np.diag(contribution[:, i]) for i in range(p)])
  return LayerRopeStats(np.asarray(contribution, float), np.asarray(covariance, float))


def test_stride_and_theta_follow_the_kept_frequencies():
  """4 of 8 pairs: strides 1 (pairs 0-3) and 2 (0, 2, 4, 6) are the only ones DeepSeek's grid
  expresses; the plan takes the one whose pairs matter most and sets rope_theta so slot j turns
  at source pair j * stride's frequency."""
  contribution = np.ones((2, 8))
  contribution[:, [2, 4, 6]] = 10.0  # the even pairs matter most
  plan = plan_rope("mha2mla", GQA, 8, [_stats(contribution)])
  assert (plan.groups, plan.pairs, plan.stride) == (1, 4, 2)
  assert plan.theta == pytest.approx(1e4 ** (2 * 4 / 8))
  slot = [plan.theta ** (-j / 4) for j in range(4)]
  source = [1e4 ** (-2 * (2 * j) / 16) for j in range(4)]
  np.testing.assert_allclose(slot, source, rtol=1e-12)
  assert plan.residual_pairs == tuple(range(8))  # one key for two heads: every pair loses some
  contribution = np.ones((2, 8))
  contribution[:, :4] = 10.0  # the fastest pairs matter most: stride 1
  plan = plan_rope("mha2mla", GQA, 8, [_stats(contribution)])
  assert plan.stride == 1 and plan.theta == pytest.approx(1e4 ** 0.5)


def test_mha2mla_keeps_the_head_with_the_larger_contribution():
  contribution = np.array([[1.0] * 8, [3.0] * 8])
  contribution[0, 5] = 9.0
  plan = plan_rope("mha2mla", GQA, 16, [_stats(contribution)])
  heads = plan.directions[0][:, 0]  # [8 slots, G]: one-hot rows
  assert heads.argmax(-1).tolist() == [1, 1, 1, 1, 1, 0, 1, 1]
  assert plan.kept[0] == pytest.approx((3 * 7 + 9) / contribution.sum())


def test_transmla_keeps_the_principal_combination_of_the_heads():
  """Two heads whose keys at every pair are proportional (k_1 = 2 k_0): one combination holds
  all of it, so one key keeps every rotation exactly (kept share 1)."""
  covariance = np.tile(np.array([[1.0, 2.0], [2.0, 4.0]]), (8, 1, 1))
  plan = plan_rope("transmla", GQA, 16, [_stats(np.ones((2, 8)), covariance)])
  direction = plan.directions[0][0, 0]
  np.testing.assert_allclose(np.abs(direction), np.array([1.0, 2.0]) / np.sqrt(5), rtol=1e-12)
  assert plan.kept[0] == pytest.approx(1.0)


def test_all_pairs_in_one_key_per_head_is_complete():
  config = variant(attention="mha", num_kv_heads=None, num_heads=2)
  plan = plan_rope("transmla", config, 32, [_stats(np.random.default_rng(0).random((2, 8)))])
  assert (plan.groups, plan.stride, plan.theta, plan.residual_pairs) == (2, 1, 1e4, ())
  assert plan.kept[0] == pytest.approx(1.0)
  with pytest.raises(ValueError, match=r"--method 'svd' is not supported: allowed mha2mla, "
                                       r"transmla"):
    plan_rope("svd", config, 32, [])
