"""Scan over layers (model.scan_layers): the same numbers as the unrolled model, one block in the
program whatever the depth, and every user of the parameters (cache, generate, sharding,
checkpoints, Hugging Face import, NNX) working in the stacked layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import bridge
from jax.sharding import PartitionSpec as P

import mla_jax
from mla_jax.checkpoint import Checkpoints
from mla_jax.config import load_config
from mla_jax.hf import params_from_hf, tensor_map
from mla_jax.model import stack_layers, unstack_layers
from mla_jax.train import Trainer, loss_fn
from tests.helpers import SMALL_MODEL, TINY_CONFIGS, rel_err, variant

MOE = variant(TINY_CONFIGS["q_lora"], num_layers=4, n_routed_experts=4, num_experts_per_tok=2,
              n_shared_experts=1, moe_intermediate_size=16, first_k_dense_replace=1,
              aux_loss_alpha=0.01)
DENSE = variant(TINY_CONFIGS["no_q_lora_odd_heads"], num_layers=3)


def _pair(cfg, length=12):
  """(unrolled model, scanned model, unrolled params, the same params stacked, tokens)."""
  scanned = variant(cfg, scan_layers=True)
  tokens = jax.random.randint(jax.random.key(0), (2, length), 0, cfg.vocab_size)
  params = mla_jax.Transformer(cfg).init(jax.random.key(1), tokens)["params"]
  return (mla_jax.Transformer(cfg), mla_jax.Transformer(scanned), params,
          stack_layers(scanned, params), tokens)


@pytest.mark.parametrize("cfg", [MOE, DENSE], ids=["moe_first_dense", "dense_mla"])
def test_scan_equals_unrolled_on_logits_losses_and_gradients(cfg):
  model, scanned, params, stacked, tokens = _pair(cfg)
  # Layout: the dense first_k_dense_replace layer stays apart, the rest stacked under 'layers'.
  kept = {k for k in stacked if k.startswith("layers_")}
  assert kept == ({"layers_0"} if cfg.n_routed_experts else set())
  repeated = cfg.num_layers - len(kept)
  assert stacked["layers"]["self_attn"]["o_proj"].shape == (repeated, cfg.num_heads,
                                                            cfg.v_head_dim, cfg.hidden_size)
  init_shapes = jax.eval_shape(scanned.init, jax.random.key(1), tokens)["params"]
  assert jax.tree_util.tree_structure(init_shapes) == jax.tree_util.tree_structure(stacked)

  @jax.jit
  def run(params, stacked):
    outs = []
    for m, p in ((model, params), (scanned, stacked)):
      logits, _ = m.apply({"params": p}, tokens)
      loss, grads = jax.value_and_grad(lambda p, m=m: loss_fn(m, p, tokens, tokens))(p)
      outs.append((logits, loss, grads, loss_fn(m, p, tokens, tokens, with_aux=False)))
    return outs

  (want, loss, grads, _), (got, scan_loss, scan_grads, scan_plain) = run(params, stacked)
  assert rel_err(got, want) <= 1e-5
  assert float(scan_loss) == pytest.approx(float(loss), rel=1e-6)
  if cfg.aux_loss_alpha:  # the balance loss of every scanned layer is counted
    assert float(scan_loss) - float(scan_plain) > 0.01 * 0.5 * (cfg.num_layers - 1)
  for got, want in zip(jax.tree_util.tree_leaves(unstack_layers(cfg, scan_grads)),
                       jax.tree_util.tree_leaves(grads)):
    assert rel_err(got, want) <= 1e-5


def test_scan_with_a_cache_prefill_decode_and_generate():
  model, scanned, params, stacked, tokens = _pair(MOE, length=7)

  @jax.jit
  def run(params, stacked):
    cache = mla_jax.init_cache(MOE, 2, 16)
    want, cache_want = model.apply({"params": params}, tokens[:, :6], cache=cache)
    got, cache_got = scanned.apply({"params": stacked}, tokens[:, :6], cache=cache)
    step, _ = scanned.apply({"params": stacked}, tokens[:, 6:], cache=cache_got,
                            attn_impl="absorbed")
    full, _ = model.apply({"params": params}, tokens)
    return want, cache_want, got, cache_got, step, full

  want, cache_want, got, cache_got, step, full = run(params, stacked)
  assert isinstance(cache_got.layers, tuple) and len(cache_got.layers) == MOE.num_layers
  assert rel_err(got, want) <= 1e-5
  for a, b in zip(jax.tree_util.tree_leaves(cache_got), jax.tree_util.tree_leaves(cache_want)):
    assert rel_err(a, b) <= 1e-6
  assert rel_err(step[:, 0], full[:, 6]) <= 1e-5
  model, scanned, params, stacked, _ = _pair(DENSE)
  prompts = [[1, 2, 3], [4]]
  np.testing.assert_array_equal(mla_jax.generate(scanned, stacked, prompts, max_new_tokens=3),
                                mla_jax.generate(model, params, prompts, max_new_tokens=3))


def test_program_holds_one_block_whatever_the_depth():
  def dots(cfg):
    model = mla_jax.Transformer(cfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    grad = jax.jit(jax.grad(lambda p: loss_fn(model, p, tokens, tokens)))
    return grad.lower(params).as_text().count("dot_general")

  shallow, deep = (variant(MOE, num_layers=n, scan_layers=True) for n in (3, 9))
  assert dots(shallow) == dots(deep)  # the same program text, 2 or 8 repeated layers
  assert dots(variant(deep, scan_layers=False)) > 2 * dots(deep)  # unrolled: grows with depth


def test_stack_and_unstack_are_inverse_and_refuse_the_wrong_layout():
  _, _, params, stacked, _ = _pair(MOE)
  back = unstack_layers(MOE, stacked)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="already there"):
    stack_layers(MOE, {**params, "layers": stacked["layers"]})
  with pytest.raises(ValueError, match="missing"):
    stack_layers(MOE, {k: v for k, v in params.items() if k != "layers_2"})
  with pytest.raises(ValueError, match="scan layout"):
    unstack_layers(MOE, params)


def test_hf_tensors_load_into_the_scan_layout():
  scanned = variant(MOE, scan_layers=True)
  rng = np.random.default_rng(0)
  tensors = {name: rng.standard_normal(shape).astype(np.float32)
             for name, (shape, _) in tensor_map(MOE).items()}
  want = stack_layers(scanned, params_from_hf(MOE, tensors))
  got = params_from_hf(scanned, tensors)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # two training-step compiles on 8 fake devices, and orbax
def test_scanned_training_is_sharded_and_checkpointed(tmp_path):
  moe = ["model.n_routed_experts=4", "model.num_experts_per_tok=2", "model.n_shared_experts=1",
         "model.moe_intermediate_size=16", "model.first_k_dense_replace=1", "model.num_layers=3"]
  train = ["train.batch_size=8", "train.seq_len=32", "train.warmup_steps=1", "train.steps=10"]
  model = [o for o in SMALL_MODEL if "num_layers" not in o] + moe + train + ["mesh.data=1"]
  one = Trainer.build(load_config(None, *model), devices=jax.devices()[:1])
  split = Trainer.build(load_config(None, *model, "model.scan_layers=true", "mesh.data=2",
                                    "mesh.fsdp=2", "mesh.tensor=2"))
  initial = jax.device_get(one.init_state())
  stacked = initial.replace(params=stack_layers(split.config.model, initial.params),
                            opt_state=split.init_state().opt_state)
  tokens = (np.arange(4_000) * 7919 % 251).astype(np.int32)
  inputs, targets = tokens[:256].reshape(8, 32), tokens[1:257].reshape(8, 32)
  _, m_one = one.train_step(jax.device_put(initial, one.state_shardings),
                            *one.put_batch(inputs, targets))
  state, m_split = split.train_step(jax.device_put(stacked, split.state_shardings),
                                    *split.put_batch(inputs, targets))
  assert float(m_split["loss"]) == pytest.approx(float(m_one["loss"]), rel=1e-5)
  experts = state.params["layers"]["mlp"]["experts_gate_proj"]  # [L',E,D,I]
  assert experts.sharding.spec == P(None, "tensor", "fsdp", None)
  assert {s.data.shape for s in experts.addressable_shards} == {(2, 2, 16, 16)}
  checkpoints = Checkpoints(tmp_path, keep=1)
  try:
    checkpoints.save(1, state, {"model": split.config.model.to_dict()}, wait=True)
    restored = checkpoints.restore(1, split.abstract_state())
  finally:
    checkpoints.close()
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
    np.testing.assert_array_equal(a, b)


def test_nnx_bridge_runs_the_scanned_model():
  _, scanned, _, _, tokens = _pair(DENSE)
  module = bridge.ToNNX(scanned, rngs=nnx.Rngs(0))
  bridge.lazy_init(module, tokens)
  params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  assert params["layers"]["self_attn"]["o_proj"].shape[0] == DENSE.num_layers
  got, _ = module(tokens)
  want, _ = scanned.apply({"params": params}, tokens)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
