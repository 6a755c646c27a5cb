"""Multi-token prediction (mla_jax/mtp.py): the MTP modules and their loss against an independent
float64 NumPy transcription of DeepSeek's MTP code, gradients into the modules and the shared
head, scan / remat / sharding as for the other layers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mla_jax
from mla_jax.model import stack_layers, transformer_hidden
from mla_jax.mtp import mtp_forward, mtp_logits, mtp_step
from mla_jax.train.step import loss_fn, loss_terms
from tests.helpers import TINY_CONFIGS, rel_err, variant
from tests.layers.test_mla import _rms, reference_mla
from tests.layers.test_moe import _reference_moe

DENSE = variant(TINY_CONFIGS["q_lora"], vocab_size=53)
# Dense main layers and an MoE MTP block, as DeepSeek-V3 has (its layer 61 is past
# first_k_dense_replace): softmax routing with a shared expert, which _reference_moe transcribes.
MOE_MTP = variant(DENSE, n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1,
                  moe_intermediate_size=24, first_k_dense_replace=2, routed_scaling_factor=1.3)


def _f64(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), jax.device_get(tree))


def _silu(z):
  return z / (1 + np.exp(-z))


def _ref_block(cfg, p, x, moe):
  """A pre-norm DeepSeek decoder layer in float64."""
  eps = cfg.rms_norm_eps
  x = x + reference_mla(cfg, p["self_attn"], _rms(x, p["input_layernorm"]["scale"], eps))
  h = _rms(x, p["post_attention_layernorm"]["scale"], eps)
  if moe:
    return x + _reference_moe(cfg, p["mlp"], h).reshape(x.shape)
  m = p["mlp"]
  return x + (_silu(h @ m["gate_proj"]) * (h @ m["up_proj"])) @ m["down_proj"]


def _ref_main_hidden(cfg, p, tokens):
  """The model's final hidden states (after model.norm): what DeepSeek's MTP takes as h^0."""
  x = p["embed_tokens"][tokens]
  for i in range(cfg.num_layers):
    x = _ref_block(cfg, p[f"layers_{i}"], x, moe=False)
  return _rms(x, p["norm"]["scale"], cfg.rms_norm_eps)


def _ref_mtp_layer(cfg, p, depth, previous_hidden_states, input_ids):
  """DeepSeekMultiTokenPredictorLayer.forward and compute_logits as vLLM and SGLang run
  DeepSeek-V3's released MTP layer, in NumPy:

    inputs_embeds = enorm(embed_tokens(input_ids)); previous = hnorm(previous_hidden_states)
    hidden = eh_proj(cat([inputs_embeds, previous], -1)); hidden = mtp_block(hidden)
    logits = shared_head.head(shared_head.norm(hidden))

  eh_proj is nn.Linear(2D, D) (weight [D, 2D]); mla-jax stores its transpose [2D, D]. The
  embedding and the head are the main model's (shared)."""
  m, eps = p[f"mtp_layers_{depth}"], cfg.rms_norm_eps
  inputs_embeds = _rms(p["embed_tokens"][input_ids], m["enorm"]["scale"], eps)
  previous = _rms(previous_hidden_states, m["hnorm"]["scale"], eps)
  weight = m["eh_proj"].T  # [D, 2D], as the checkpoint stores it
  hidden = np.concatenate([inputs_embeds, previous], axis=-1) @ weight.T
  hidden = _ref_block(cfg, m, hidden, moe=cfg.is_moe_layer(cfg.num_layers + depth))
  logits = _rms(hidden, m["shared_head"]["norm"]["scale"], eps) @ p["lm_head"]
  return hidden, logits


def _ce(logits, targets):
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, targets[..., None], axis=-1).mean()


def _ref_loss(cfg, p, inputs, targets, weight):
  """DeepSeek-V3 report eqs. 21-25: depth k at position i sees h_i^{k-1} and t_{i+k} and is
  scored on t_{i+k+1}; L = L_main + weight / D * sum_k L_k."""
  hidden = _ref_main_hidden(cfg, p, inputs)
  main = _ce(hidden @ p["lm_head"], targets)
  t, depths, h = inputs.shape[1], [], hidden
  for depth in range(cfg.num_mtp_layers):
    k = depth + 1
    h, logits = _ref_mtp_layer(cfg, p, depth, h[:, :t - k], inputs[:, k:])
    depths.append((logits, _ce(logits, targets[:, k:])))
  return main + weight / cfg.num_mtp_layers * sum(ce for _, ce in depths), main, depths


def _model(cfg, depths, seed=0):
  cfg = dataclasses.replace(cfg, num_mtp_layers=depths)
  model = mla_jax.Transformer(cfg)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
  rng = np.random.default_rng(seed)
  # Larger-than-init weights and non-unit norm scales, so a swapped norm or order shows.
  params = jax.tree_util.tree_map(
      lambda a: jnp.asarray(1 + 0.3 * rng.standard_normal(a.shape) if a.ndim == 1 else
                            a * 4, jnp.float32), params)
  return model, params


def _batch(cfg, seed=1, b=2, t=12):
  tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t + 1))
  return jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])


@pytest.mark.parametrize("base", [DENSE, MOE_MTP], ids=["dense", "moe_mtp_block"])
@pytest.mark.parametrize("depths", [1, 2])
def test_mtp_logits_and_loss_equal_the_float64_reference(base, depths):
  model, params = _model(base, depths)
  cfg = model.config
  inputs, targets = _batch(cfg)
  expected, expected_main, expected_depths = _ref_loss(cfg, _f64(params), np.asarray(inputs),
                                                       np.asarray(targets), 0.3)
  hidden, _, _ = transformer_hidden(cfg, params, inputs)
  logits, _ = mtp_forward(cfg, params, hidden, inputs)
  assert [x.shape for x in logits] == [(2, 12 - k, cfg.vocab_size) for k in range(1, depths + 1)]
  for got, (want, _) in zip(logits, expected_depths):
    assert rel_err(got, want) <= 1e-5
  loss, terms = loss_terms(model, params, inputs, targets, mtp_loss_weight=0.3)
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(terms["main_loss"]) == pytest.approx(expected_main, rel=1e-5)
  for k, (want_logits, want_ce) in enumerate(expected_depths, start=1):
    assert float(terms[f"mtp_loss_{k}"]) == pytest.approx(want_ce, rel=1e-5)
    accuracy = np.mean(want_logits.argmax(-1) == np.asarray(targets)[:, k:])
    assert float(terms[f"mtp_accuracy_{k}"]) == pytest.approx(accuracy, abs=1e-6)


def test_the_reference_sees_a_swapped_concatenation():
  """The report writes [h; Emb], DeepSeek's code [Emb; h]: the reference tells them apart."""
  model, params = _model(DENSE, 1)
  cfg = model.config
  inputs, _ = _batch(cfg)
  hidden, _, _ = transformer_hidden(cfg, params, inputs)
  swapped = jax.tree_util.tree_map(lambda a: a, params)
  d = cfg.hidden_size
  w = params["mtp_layers_0"]["eh_proj"]
  swapped["mtp_layers_0"]["eh_proj"] = jnp.concatenate([w[d:], w[:d]])  # reads [h; Emb]
  _, want = _ref_mtp_layer(cfg, _f64(params), 0, _ref_main_hidden(cfg, _f64(params),
                                                                  np.asarray(inputs))[:, :-1],
                           np.asarray(inputs)[:, 1:])
  wrong, _ = mtp_forward(cfg, swapped, hidden, inputs)
  assert rel_err(wrong[0], want) > 1e-2


def test_gradients_reach_the_mtp_modules_and_the_shared_head():
  model, params = _model(DENSE, 2)
  inputs, targets = _batch(model.config)
  grads = jax.jit(jax.grad(lambda p: loss_fn(model, p, inputs, targets)))(params)
  for depth in range(2):
    for leaf in jax.tree_util.tree_leaves(grads[f"mtp_layers_{depth}"]):
      assert float(jnp.abs(leaf).max()) > 0
  # The shared embedding and head get the MTP depths' gradient on top of the main loss's.
  main_only = jax.jit(jax.grad(lambda p: loss_fn(model, p, inputs, targets,
                                                 mtp_loss_weight=0.0)))(params)
  for name in ("lm_head", "embed_tokens"):
    assert rel_err(grads[name], main_only[name]) > 1e-3, name
  assert rel_err(grads["norm"]["scale"], main_only["norm"]["scale"]) > 1e-3  # via h^0
  for leaf in jax.tree_util.tree_leaves(main_only["mtp_layers_0"]):
    assert float(jnp.abs(leaf).max()) == 0.0  # lambda = 0: nothing reaches them


@pytest.mark.slow
def test_scan_layers_and_remat_give_the_same_loss_and_gradients():
  model, params = _model(variant(DENSE, num_layers=3), 1)
  cfg = model.config
  inputs, targets = _batch(cfg)
  loss, grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(model, p, inputs, targets)))(params)
  scanned = mla_jax.Transformer(dataclasses.replace(cfg, scan_layers=True), remat="full")
  stacked = stack_layers(scanned.config, params)
  assert set(stacked) == {"embed_tokens", "layers", "norm", "lm_head", "mtp_layers_0"}
  loss2, grads2 = jax.jit(jax.value_and_grad(lambda p: loss_fn(scanned, p, inputs, targets)))(
      stacked)
  assert float(loss2) == pytest.approx(float(loss), rel=1e-6)
  assert rel_err(grads2["mtp_layers_0"]["eh_proj"], grads["mtp_layers_0"]["eh_proj"]) <= 1e-5
  assert rel_err(grads2["lm_head"], grads["lm_head"]) <= 1e-5


@pytest.mark.slow
def test_mtp_step_with_a_cache_equals_the_causal_forward():
  """Filling the module's own cache in pieces (ragged), as drafting does, gives the causal
  forward's hidden states and logits."""
  model, params = _model(DENSE, 1)
  cfg = model.config
  inputs, _ = _batch(cfg, t=10)
  hidden, _, _ = transformer_hidden(cfg, params, inputs)
  full, _, _ = mtp_step(cfg, params, 0, hidden[:, :-1], inputs[:, 1:])
  cache = mla_jax.Cache(layers=(mla_jax.init_layer_cache(cfg, 2, 16),),
                        lengths=jnp.zeros((2,), jnp.int32))
  first, cache, _ = mtp_step(cfg, params, 0, hidden[:, :5], inputs[:, 1:6], cache,
                             num_tokens=jnp.array([5, 3]), attn_impl="naive")
  assert cache.lengths.tolist() == [5, 3]
  rest = []
  for row, start in enumerate((5, 3)):  # the rest of each row after its own length
    row_cache = jax.tree_util.tree_map(lambda a: a[row:row + 1], cache)
    out, _, _ = mtp_step(cfg, params, 0, hidden[row:row + 1, start:9],
                         inputs[row:row + 1, start + 1:10], row_cache)
    rest.append(out[0])
  assert rel_err(first[0], full[0, :5]) <= 1e-5 and rel_err(first[1, :3], full[1, :3]) <= 1e-5
  assert rel_err(rest[0], full[0, 5:]) <= 1e-5 and rel_err(rest[1], full[1, 3:]) <= 1e-5
  logits = mtp_logits(cfg, params, 0, full)
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, inputs[:, 1:]).shape
  assert logits.shape == (2, 9, cfg.vocab_size) and expected == (2, 9)


@pytest.mark.slow
def test_mtp_parameters_are_sharded_by_the_library_rules():
  from jax.sharding import PartitionSpec as P

  from mla_jax.model import logical_axes
  from mla_jax.sharding import make_mesh, shard

  model, params = _model(DENSE, 1)
  assert logical_axes(model.config)["mtp_layers_0"]["eh_proj"] == ("embed", None)
  mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1, "sequence": 1})
  placed = shard(params, mesh)
  assert placed["mtp_layers_0"]["eh_proj"].sharding.spec == P("fsdp", None)
  assert placed["mtp_layers_0"]["self_attn"]["kv_b_proj"].sharding.spec == \
      placed["layers_0"]["self_attn"]["kv_b_proj"].sharding.spec
  inputs, targets = _batch(model.config, b=8)
  loss = jax.jit(lambda p: loss_fn(model, p, inputs, targets))(placed)
  assert float(loss) == pytest.approx(float(loss_fn(model, params, inputs, targets)), rel=1e-5)


def test_bad_mtp_settings_are_named():
  with pytest.raises(ValueError, match=r"model\.num_mtp_layers=-1 is invalid: must be >= 0"):
    variant(DENSE, num_mtp_layers=-1)
  model, params = _model(DENSE, 2)
  with pytest.raises(ValueError, match=r"2 tokens per sequence leave no position for MTP depth 2"):
    loss_fn(model, params, jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32))
  with pytest.raises(ValueError, match=r"MTP depth 2 does not exist: model\.num_mtp_layers=2"):
    mtp_step(model.config, params, 2, jnp.zeros((1, 1, 64)), jnp.zeros((1, 1), jnp.int32))
