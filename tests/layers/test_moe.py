"""DeepSeekMoE: the three routers on hand-made scores, the layer against a per-token loop, and
the balance loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.config import ModelConfig
from mla_jax.layers.moe import DeepSeekMoE, balance_loss, route
from tests.helpers import rel_err

BASE = dict(hidden_size=16, num_heads=2, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
            kv_lora_rank=8, q_lora_rank=None, moe_intermediate_size=8)


def _cfg(**kw):
  return ModelConfig(**{**BASE, **kw})


SCORES = jnp.array([[0.05, 0.30, 0.10, 0.25, 0.02, 0.08, 0.15, 0.05]])  # one token, 8 experts


def test_greedy_softmax_router_scales_the_chosen_scores():
  cfg = _cfg(n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=2.0)
  weights = np.asarray(route(SCORES, jnp.zeros(8), cfg))[0]
  np.testing.assert_allclose(weights, [0, 0.6, 0, 0.5, 0, 0, 0, 0], rtol=1e-6)
  normalised = np.asarray(route(SCORES, jnp.zeros(8), _cfg(
      n_routed_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
      routed_scaling_factor=2.0)))[0]
  # V2: normalising replaces scaling (DeepSeek-V2's reference code does one or the other).
  np.testing.assert_allclose(normalised[[1, 3]], [0.30 / 0.55, 0.25 / 0.55], rtol=1e-6)


def test_group_limited_greedy_ranks_groups_by_their_best_expert():
  cfg = _cfg(n_routed_experts=8, num_experts_per_tok=3, topk_method="group_limited_greedy",
             n_group=4, topk_group=2)
  scores = jnp.array([[0.30, 0.05, 0.25, 0.20, 0.08, 0.02, 0.22, 0.01]])
  # Group maxima .30 .25 .08 .22: groups 0 and 1 survive, so the third expert is 3 (.20), not
  # expert 6 (.22), which plain greedy takes.
  weights = np.asarray(route(scores, jnp.zeros(8), cfg))[0]
  assert np.nonzero(weights)[0].tolist() == [0, 2, 3]
  greedy = np.asarray(route(scores, jnp.zeros(8), _cfg(n_routed_experts=8, num_experts_per_tok=3)))
  assert np.nonzero(greedy[0])[0].tolist() == [0, 2, 6]


def test_v3_router_chooses_with_the_bias_and_weighs_without_it():
  cfg = _cfg(n_routed_experts=8, num_experts_per_tok=2, scoring_func="sigmoid",
             topk_method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True,
             routed_scaling_factor=2.5)
  bias = jnp.array([0, 0, 0, 0, 0.5, 0.5, 0, 0])  # lifts group 2 (experts 4, 5) to the top
  weights = np.asarray(route(SCORES, bias, cfg))[0]
  # Biased group sums (top-2 of 2): .35 .35 1.10 .20; group 2 wins either way, and its biased
  # experts 4 (.52) and 5 (.58) beat every other; their weights use the unbiased .02 and .08.
  assert np.nonzero(weights)[0].tolist() == [4, 5]
  np.testing.assert_allclose(weights[[4, 5]], np.array([0.02, 0.08]) / 0.10 * 2.5, rtol=1e-5)


def _reference_moe(cfg, p, x):
  """Per-token loop in NumPy: run only the chosen experts, as a dispatching MoE would."""
  x = np.asarray(x, np.float64).reshape(-1, cfg.hidden_size)
  logits = x @ np.asarray(p["gate"], np.float64)
  scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
  out = np.zeros_like(x)
  for t in range(len(x)):
    for e in np.argsort(-scores[t])[:cfg.num_experts_per_tok]:
      h = silu(x[t] @ p["experts_gate_proj"][e]) * (x[t] @ p["experts_up_proj"][e])
      out[t] += cfg.routed_scaling_factor * scores[t, e] * (h @ p["experts_down_proj"][e])
    s = p["shared_experts"]
    out[t] += (silu(x[t] @ s["gate_proj"]) * (x[t] @ s["up_proj"])) @ s["down_proj"]
  return out


def test_layer_equals_a_per_token_dispatching_loop():
  cfg = _cfg(n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=2,
             routed_scaling_factor=1.7)
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  layer = DeepSeekMoE(cfg)
  params = layer.init(jax.random.key(1), x)["params"]
  params = jax.tree_util.tree_map(lambda p: p * 10, params)  # sharper routing than at init
  y = layer.apply({"params": params}, x)
  assert y.shape == x.shape
  assert rel_err(y.reshape(-1, 16), _reference_moe(cfg, jax.device_get(params), x)) <= 1e-5
  assert params["shared_experts"]["gate_proj"].shape == (16, 16)  # 2 shared experts of 8


def test_balance_loss_is_sown_and_follows_its_formula():
  cfg = _cfg(n_routed_experts=4, num_experts_per_tok=1, aux_loss_alpha=0.1)
  scores = jnp.array([[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1]])  # both tokens go to expert 0
  weights = route(scores, jnp.zeros(4), cfg)
  # f = [4/(1*2) * 2, 0, 0, 0] = [4, 0, 0, 0]; P_0 = 0.65: loss = 2.6 (balanced routing gives 1).
  assert float(balance_loss(scores, weights, cfg)) == pytest.approx(2.6)
  x = jax.random.normal(jax.random.key(0), (1, 3, 16))
  layer = DeepSeekMoE(cfg)
  params = layer.init(jax.random.key(1), x)["params"]
  _, state = layer.apply({"params": params}, x, mutable=["losses"])
  (sown,) = state["losses"]["expert_balance"]
  assert 0.1 * 0.9 < float(sown) < 0.1 * 4.0  # alpha x (between balanced-ish and all-on-one)


@pytest.mark.parametrize("changes, field", [
    (dict(n_routed_experts=4, num_experts_per_tok=5), "model.num_experts_per_tok"),
    (dict(n_routed_experts=6, n_group=4), "model.n_group"),
    (dict(n_routed_experts=8, n_group=4, topk_group=5), "model.topk_group"),
    (dict(n_routed_experts=8, scoring_func="relu"), "model.scoring_func"),
    (dict(n_routed_experts=8, scoring_func="sigmoid"), "model.topk_method"),
    (dict(n_routed_experts=8, first_k_dense_replace=9), "model.first_k_dense_replace"),
    (dict(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3), "model.topk_group"),
])
def test_invalid_moe_configs_name_the_field(changes, field):
  with pytest.raises(ValueError, match="^" + field.replace(".", r"\.") + "="):
    _cfg(**changes)
