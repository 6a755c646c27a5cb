"""DeepSeekMoE: the three routers on hand-made scores, the layer against a per-token loop, the
balance loss, and the dispatching implementation against the dense reference (outputs,
gradients, ragged and empty experts, FLOPs, experts split over 8 fake devices)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.config import ModelConfig
from mla_jax.layers.moe import (DeepSeekMoE, balance_loss, default_block_size, dispatch_experts,
                                plan_dispatch, route, route_topk)
from mla_jax.sharding import make_mesh, tree_shardings
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
    (dict(n_routed_experts=8, moe_impl="sparse"), "model.moe_impl"),
    (dict(moe_impl="ragged"), "model.moe_impl"),
])
def test_invalid_moe_configs_name_the_field(changes, field):
  with pytest.raises(ValueError, match="^" + field.replace(".", r"\.") + "="):
    _cfg(**changes)


ROUTERS = {
    "v2_greedy_scaled": dict(n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=1.7,
                             n_shared_experts=2),
    "v2_group_limited": dict(n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
                             topk_method="group_limited_greedy", n_group=4, topk_group=2,
                             norm_topk_prob=True),
    "v3_sigmoid_bias": dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                            scoring_func="sigmoid", topk_method="noaux_tc", n_group=4,
                            topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5),
}


def _inputs(shape):
  """Random tokens whose feature 0 is a constant 5, so the router can rule an expert out."""
  return jax.random.normal(jax.random.key(0), shape).at[..., 0].set(5.0)


def _sharp_params(cfg, x):
  """Init params scaled up (sharp routing), with expert 0 never chosen (an expert with no token):
  its router column reads only feature 0, the constant 5, times -20."""
  params = DeepSeekMoE(cfg).init(jax.random.key(1), x)["params"]
  params = jax.tree_util.tree_map(lambda p: p * 10, params)
  params["gate"] = params["gate"].at[:, 0].set(0.0).at[0, 0].set(-20.0)
  if "e_score_correction_bias" in params:
    params["e_score_correction_bias"] = jnp.linspace(-0.3, 0.3, 8)
  return params


def _value_and_grads(cfg, params, x, cotangent):
  def loss(p, x):
    return jnp.sum(DeepSeekMoE(cfg).apply({"params": p}, x) * cotangent)
  return jax.value_and_grad(loss, argnums=(0, 1))(params, x)


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_dispatch_equals_dense_on_outputs_and_gradients(name):
  cfg = _cfg(**ROUTERS[name])
  x = _inputs((2, 13, 16))
  params = _sharp_params(cfg, x)
  dense = dataclasses.replace(cfg, moe_impl="dense")
  assert cfg.moe_impl == "dispatch"  # the default
  y = DeepSeekMoE(cfg).apply({"params": params}, x)
  y_ref = DeepSeekMoE(dense).apply({"params": params}, x)
  assert rel_err(y, y_ref) <= 1e-5
  # The case is what it claims: ragged token counts per expert, and expert 0 gets none.
  logits = x.reshape(-1, 16) @ params["gate"]
  scores = jax.nn.softmax(logits) if cfg.scoring_func == "softmax" else jax.nn.sigmoid(logits)
  experts, _ = route_topk(scores, params.get("e_score_correction_bias", jnp.zeros(8)), cfg)
  counts = np.bincount(np.asarray(experts).ravel(), minlength=8)
  assert counts[0] == 0 and counts.max() > counts[counts > 0].min()
  cotangent = jax.random.normal(jax.random.key(2), y.shape)
  (_, grads), (_, grads_ref) = (_value_and_grads(c, params, x, cotangent) for c in (cfg, dense))
  for path, got in jax.tree_util.tree_flatten_with_path(grads)[0]:
    want = dict(jax.tree_util.tree_flatten_with_path(grads_ref)[0])[path]
    if np.abs(np.asarray(want)).max() > 0:
      assert rel_err(got, want) <= 1e-5, jax.tree_util.keystr(path)
    else:  # expert 0's weights, the correction bias: no gradient in either
      assert np.abs(np.asarray(got)).max() == 0, jax.tree_util.keystr(path)


def _ragged_dot_reference(x, experts, weights, w_gate, w_up, w_down):
  """The same routed sum through jax.lax.ragged_dot, pairs sorted by expert in NumPy."""
  n, k = experts.shape
  flat = np.asarray(experts).ravel()
  order = np.argsort(flat, kind="stable")
  sizes = jnp.asarray(np.bincount(flat, minlength=w_gate.shape[0]), jnp.int32)
  rows = x[order // k]  # [M,D] sorted by expert
  hidden = jax.nn.silu(jax.lax.ragged_dot(rows, w_gate, sizes)) * jax.lax.ragged_dot(rows, w_up,
                                                                                    sizes)
  out = jnp.zeros((n * k, x.shape[1])).at[order].set(jax.lax.ragged_dot(hidden, w_down, sizes))
  return jnp.einsum("NKD,NK->ND", out.reshape(n, k, -1), weights)


@pytest.mark.parametrize("block_size", [1, 3, 8, 64])
def test_grouped_dispatch_matches_ragged_dot_on_skewed_routing(block_size):
  e, d, i = 5, 6, 4
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], (11, d))
  # Expert 0 takes most pairs, expert 2 none, expert 4 one.
  experts = jnp.array([[0, 1], [0, 3], [0, 1], [0, 3], [0, 1], [0, 3], [3, 0], [1, 0], [4, 0],
                       [0, 3], [1, 3]], jnp.int32)
  weights = jax.random.uniform(keys[1], (11, 2))
  w_gate, w_up = (jax.random.normal(k, (e, d, i)) for k in keys[2:4])
  w_down = jax.random.normal(keys[4], (e, i, d))
  got = dispatch_experts(x, experts, weights, w_gate, w_up, w_down, block_size=block_size)
  want = _ragged_dot_reference(x, experts, weights, w_gate, w_up, w_down)
  assert rel_err(got, want) <= 1e-5


def test_plan_pads_each_expert_to_whole_blocks_and_drops_foreign_pairs():
  experts = jnp.array([2, 0, 2, 2, 4, 0, 2], jnp.int32)  # 4 = E: a pair another device runs
  plan = plan_dispatch(experts, 4, block_size=2)
  rows = np.asarray(plan.rows)
  # Expert 0: pairs 1, 5 -> rows 0, 1. Expert 1: none. Expert 2: pairs 0, 2, 3, 6 -> rows 2..5.
  assert rows.tolist() == [2, 0, 3, 4, plan.num_rows, 1, 5]
  assert plan.num_rows == 2 * -(-(7 + 4 * 1) // 2)  # worst case: ceil((M + E (b-1)) / b) blocks
  assert np.asarray(plan.block_expert)[:3].tolist() == [0, 2, 2]
  assert default_block_size(6, 64) == 1 and default_block_size(4096 * 6, 64) == 128


def test_dispatch_flops_follow_top_k_not_the_expert_count():
  cfg = _cfg(n_routed_experts=32, num_experts_per_tok=2, n_shared_experts=1,
             moe_intermediate_size=32, hidden_size=32)
  x = jnp.zeros((2, 512, 32))
  params = DeepSeekMoE(cfg).init(jax.random.key(0), x)["params"]

  def flops(c):
    apply = jax.jit(lambda p, x: DeepSeekMoE(c).apply({"params": p}, x))
    return apply.lower(params, x).compile().cost_analysis()["flops"]

  n, d, i = 1024, 32, 32
  active = 2 * n * (3 * d * i * (2 + 1) + d * 32)  # 2 routed + 1 shared expert, and the router
  dispatch, dense = flops(cfg), flops(dataclasses.replace(cfg, moe_impl="dense"))
  assert active <= dispatch <= 1.5 * active
  # The reference runs all 32 experts, 16x the routed FLOPs (7.7x the whole layer's dispatch
  # FLOPs here, block padding and the shared expert included).
  assert dense > 16 * 3 * 2 * n * 2 * d * i and dense > 6 * dispatch


def test_expert_parallel_dispatch_on_8_fake_devices_equals_one_device():
  cfg = _cfg(**ROUTERS["v2_group_limited"])
  x = _inputs((4, 9, 16))
  params = _sharp_params(cfg, x)
  cotangent = jax.random.normal(jax.random.key(2), x.shape)
  value, grads = _value_and_grads(cfg, params, x, cotangent)
  mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 4, "sequence": 1})
  placed = jax.device_put(params, tree_shardings(params, mesh))
  assert {s.data.shape for s in placed["experts_up_proj"].addressable_shards} == {(2, 16, 8)}
  step = jax.jit(lambda p, x: _value_and_grads(cfg, p, x, cotangent))
  with jax.set_mesh(mesh):
    value_split, grads_split = step(placed, x)
    assert "shard_map" in str(jax.make_jaxpr(step)(placed, x))
    hlo = step.lower(placed, x).compile().as_text()
  assert float(value_split) == pytest.approx(float(value), rel=1e-5)
  for got, want in zip(jax.tree_util.tree_leaves(grads_split), jax.tree_util.tree_leaves(grads)):
    if np.abs(np.asarray(want)).max() > 0:
      assert rel_err(got, want) <= 1e-5
  # Experts stay on their devices: no all-gather of an expert weight (8 experts of [16, 8]).
  gathered = [line for line in hlo.splitlines() if "all-gather(" in line]
  assert not any("[8,16,8]" in line or "[8,8,16]" in line for line in gathered), gathered
