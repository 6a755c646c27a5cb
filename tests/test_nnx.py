"""mla_jax.nnx: native NNX modules with the Linen modules' parameter tree and numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mla_jax
import mla_jax.nnx as mnnx
from mla_jax.config import ModelConfig
from mla_jax.model import transformer_specs

BASE = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, intermediate_size=48,
            max_seq_len=32)
CONFIGS = {
    "mla": ModelConfig(**BASE, q_lora_rank=8),
    "mla_scan": ModelConfig(**BASE, q_lora_rank=None, scan_layers=True),
    "moe_v3": ModelConfig(**{**BASE, "num_layers": 3}, q_lora_rank=None, n_routed_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=16,
                          first_k_dense_replace=1, n_shared_experts=1, topk_method="noaux_tc",
                          scoring_func="sigmoid", n_group=2, topk_group=1, aux_loss_alpha=0.01),
    "gqa": ModelConfig(**{**BASE, "num_heads": 4}, attention="gqa", num_kv_heads=2),
}
TOKENS = np.arange(12, dtype=np.int32).reshape(2, 6) * 5 % 64


def _linen_params(config, seed=3):
  return mla_jax.Transformer(config).init(jax.random.key(seed), TOKENS)["params"]


def _shapes(tree):
  return jax.tree_util.tree_map(lambda x: (tuple(x.shape), str(x.dtype)), tree)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_native_transformer_has_the_linen_tree_and_logits(name):
  config = CONFIGS[name]
  params = _linen_params(config)
  model = mnnx.Transformer(config, rngs=nnx.Rngs(0))
  assert _shapes(mnnx.model_params(model)) == _shapes(params)  # names, shapes, dtypes
  mnnx.load_params(model, params)
  linen_logits, _ = mla_jax.Transformer(config).apply({"params": params}, TOKENS)
  nnx_logits, _ = model(jnp.asarray(TOKENS))
  assert np.abs(np.asarray(nnx_logits) - np.asarray(linen_logits)).max() <= 1e-6
  assert np.abs(np.asarray(linen_logits)).max() > 1e-3  # not trivially zero
  # and back: the NNX model's parameters are the Linen tree, leaf for leaf
  back = mnnx.model_params(model)
  assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, back, params)))


def test_prefill_then_decode_equals_the_full_forward():
  config = CONFIGS["mla"]
  model = mnnx.Transformer(config, rngs=nnx.Rngs(1))
  full, _ = model(jnp.asarray(TOKENS))  # [B,T,V]
  cache = mla_jax.init_cache(config, 2, 16)
  prefix, cache = model(jnp.asarray(TOKENS[:, :4]), cache=cache)
  steps = [prefix]
  for t in range(4, 6):
    logits, cache = model(jnp.asarray(TOKENS[:, t:t + 1]), cache=cache)
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)
  assert np.asarray(cache.lengths).tolist() == [6, 6]


def test_absorbed_weights_give_the_same_decode():
  config = CONFIGS["mla"]
  model = mnnx.Transformer(config, rngs=nnx.Rngs(2))
  cache = mla_jax.init_cache(config, 2, 8)
  plain, _ = model(jnp.asarray(TOKENS[:, :3]), cache=cache, attn_impl="flash")
  model.absorb()
  assert set(nnx.to_pure_dict(nnx.state(model, mnnx.Absorbed))["layers_0"]["self_attn"]) == {
      "w_uk", "w_uv"}
  absorbed, _ = model(jnp.asarray(TOKENS[:, :3]), cache=mla_jax.init_cache(config, 2, 8),
                      attn_impl="flash")
  np.testing.assert_allclose(absorbed, plain, atol=1e-6)


@pytest.mark.slow  # the NNX forward, cache and engine tests stay in the default suite
def test_nnx_jit_training_steps_match_linen_gradients():
  """nnx.jit + optax: the NNX gradients are the Linen model's, and the loss falls."""
  config = CONFIGS["moe_v3"]
  params = _linen_params(config)
  model = mnnx.Transformer(config, rngs=nnx.Rngs(0))
  mnnx.load_params(model, params)
  inputs, targets = jnp.asarray(TOKENS[:, :-1]), jnp.asarray(TOKENS[:, 1:])

  def nll(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  def linen_loss(p):
    (logits, _), state = mla_jax.Transformer(config).apply({"params": p}, inputs,
                                                            mutable=["losses"])
    return nll(logits) + sum(jnp.sum(v) for v in jax.tree_util.tree_leaves(state["losses"]))

  def nnx_loss(m):
    logits, _ = m(inputs)
    return nll(logits) + m.expert_balance.get_value()  # the summed loss of this call

  linen_grads = jax.grad(linen_loss)(params)
  nnx_grads = nnx.grad(nnx_loss)(model)
  nnx_grads = nnx.to_pure_dict(nnx_grads)
  diffs = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                 nnx_grads, linen_grads)
  assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-6

  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(nnx_loss)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(5)]
  assert losses[-1] < losses[0] - 0.05, losses
  # one Losses leaf, the model's own, overwritten per call: the state keeps its structure
  assert list(nnx.to_pure_dict(nnx.state(model, mnnx.Losses))) == ["expert_balance"]


def test_repeated_calls_keep_one_state_structure_and_compile_once():
  """The expert-balance loss is overwritten, never appended: nnx.jit traces once."""
  model = mnnx.Transformer(CONFIGS["moe_v3"], rngs=nnx.Rngs(0))
  traces = []

  @nnx.jit
  def forward(model, tokens):
    traces.append(1)
    return model(tokens)[0]

  for _ in range(3):
    forward(model, jnp.asarray(TOKENS))
  assert len(traces) == 1
  assert float(model.expert_balance.get_value()) > 0


def test_generate_and_stream_take_the_nnx_model():
  config = CONFIGS["mla"]
  params = _linen_params(config)
  model = mnnx.Transformer(config, rngs=nnx.Rngs(0))
  mnnx.load_params(model, params)
  prompts = [[3, 5, 7], [9, 2]]
  want = mla_jax.generate(mla_jax.Transformer(config), params, prompts, max_new_tokens=4)
  got = mla_jax.generate(model, prompts, max_new_tokens=4)
  np.testing.assert_array_equal(got, want)
  assert list(mla_jax.stream(model, [3, 5, 7], max_new_tokens=4)) == want[0, 3:].tolist()
  with pytest.raises(TypeError, match="an NNX model holds its parameters"):
    mla_jax.generate(model, params, prompts, max_new_tokens=4)
  with pytest.raises(TypeError, match="needs the prompts"):
    mla_jax.generate(mla_jax.Transformer(config), prompts, max_new_tokens=4)
  np.testing.assert_array_equal(mla_jax.generate(model, prompts=prompts, max_new_tokens=4), want)


def test_a_linen_checkpoint_loads_into_the_nnx_model_and_back(tmp_path):
  import orbax.checkpoint as ocp

  config = CONFIGS["mla_scan"]
  params = jax.device_get(_linen_params(config))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "linen", params)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "linen", jax.tree_util.tree_map(
      ocp.utils.to_shape_dtype_struct, params))
  model = mnnx.Transformer(config, rngs=nnx.Rngs(5))
  mnnx.load_params(model, restored)
  checkpointer.save(tmp_path / "nnx", mnnx.model_params(model))
  checkpointer.wait_until_finished()
  again = checkpointer.restore(tmp_path / "nnx", jax.tree_util.tree_map(
      ocp.utils.to_shape_dtype_struct, params))
  assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, again, params)))
  linen_logits, _ = mla_jax.Transformer(config).apply({"params": again}, TOKENS)
  np.testing.assert_allclose(model(jnp.asarray(TOKENS))[0], linen_logits, atol=1e-6)


def test_load_params_names_the_path_that_does_not_fit():
  model = mnnx.Transformer(CONFIGS["mla"], rngs=nnx.Rngs(0))
  other = _linen_params(CONFIGS["mla_scan"])  # the scan layout: 'layers' instead of layers_i
  with pytest.raises(ValueError, match=r"params: missing \['layers_0', 'layers_1'\], unexpected "
                                       r"\['layers'\]"):
    mnnx.load_params(model, other)
  wrong = _linen_params(ModelConfig(**{**BASE, "hidden_size": 48}, q_lora_rank=8))
  with pytest.raises(ValueError, match=r"params/embed_tokens has shape \(64, 48\), this model's "
                                       r"is \(64, 32\)"):
    mnnx.load_params(model, wrong)


def test_the_layer_alone_matches_linen_with_a_cache():
  config = CONFIGS["mla"]
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  linen = mla_jax.MultiHeadLatentAttention(config)
  params = linen.init(jax.random.key(1), x)["params"]
  layer = mnnx.MultiHeadLatentAttention(config, rngs=nnx.Rngs(0), record_intermediates=True)
  mnnx.load_params(layer, params)
  cache = mla_jax.init_layer_cache(config, 2, 8)
  lengths = jnp.zeros((2,), jnp.int32)
  want, want_cache = linen.apply({"params": params}, x, cache=cache, lengths=lengths)
  (got, got_cache), seen = nnx.capture(layer, nnx.Intermediate)(x, cache=cache, lengths=lengths)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(got_cache.c_kv, want_cache.c_kv, atol=1e-6)
  _, sown = linen.apply({"params": params}, x, cache=cache, lengths=lengths,
                        mutable=["intermediates"])
  np.testing.assert_allclose(jax.tree_util.tree_leaves(seen["q_lat"])[0],
                             sown["intermediates"]["q_lat"][0], atol=1e-6)
  with pytest.raises(ValueError, match="needs model.attention='mla'"):
    mnnx.MultiHeadLatentAttention(CONFIGS["gqa"], rngs=nnx.Rngs(0))


def test_params_carry_their_logical_axes_as_sharding_metadata():
  config = CONFIGS["mla"]
  model = mnnx.Transformer(config, rngs=nnx.Rngs(0))
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
  want = mla_jax.model.logical_axes(config)
  assert jax.tree_util.tree_map(tuple, specs, is_leaf=lambda x: isinstance(
      x, jax.sharding.PartitionSpec)) == want
  assert want["layers_0"]["self_attn"]["kv_b_proj"] == ("kv_lora", "heads", "head_dim")
  assert set(transformer_specs(config)) == set(want)
