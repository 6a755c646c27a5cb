"""Flash attention (layers/flash_attention.py): outputs and gradients equal to a dense softmax
written here and to the model's naive path, for MLA's shapes and the baselines', block sizes that
do and do not divide T, ragged lengths and prefill into a cache, under jit, grad, scan and remat;
and the compiled step's memory linear in T."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mla_jax
from mla_jax.kinds import attention_kind
from mla_jax.layers.flash_attention import flash_attention
from mla_jax.layers.masking import FLASH_ATTENTION_MIN_TOKENS, resolve_attn_impl
from tests.helpers import TINY_CONFIGS, flash_operands, rel_err, variant

TOL = 1e-5  # float32, relative to each tensor's scale


def dense_attention(q, k, v, q_rope, k_rope, offsets, kv_lengths, scale):
  """Softmax over the whole [B,H,T,S] scores, keys repeated per head, masked as documented."""
  b, t, h, _ = q.shape
  s, g = k.shape[1], k.shape[2]
  keys, values = jnp.repeat(k, h // g, axis=2), jnp.repeat(v, h // g, axis=2)
  scores = jnp.einsum("bthk,bshk->bhts", q, keys)
  if q_rope is not None:
    scores = scores + jnp.einsum("bthr,bsr->bhts", q_rope, k_rope)
  positions = (0 if offsets is None else offsets[:, None]) + jnp.arange(t)[None, :]  # [B|1,T]
  if kv_lengths is None:
    kv_lengths = jnp.full((b,), s)
  slot = jnp.arange(s)
  visible = (slot <= positions[..., None]) & (slot < kv_lengths[:, None, None])  # [B,T,S]
  scores = jnp.where(visible[:, None], scores * scale, -jnp.inf)
  probs = jnp.where(visible[:, None], jax.nn.softmax(scores, axis=-1), 0.0)
  return jnp.einsum("bhts,bshv->bthv", probs, values)


def _check_against_dense(operands, offsets, kv_lengths, real, block_q, block_k, scale=0.3):
  """Outputs and the gradients of every float operand of a weighted sum over the real queries."""
  weights = jax.random.normal(jax.random.key(9), operands[0].shape[:3] + operands[2].shape[3:])

  def loss(attention):
    def f(*xs):
      return jnp.sum(jnp.where(real[:, :, None, None], attention(*xs) * weights, 0.0))
    return f

  flash = lambda q, k, v, qr, kr: flash_attention(  # noqa: E731
      q, k, v, q_rope=qr, k_rope=kr, scale=scale, query_offsets=offsets,
      kv_lengths=kv_lengths, block_q=block_q, block_k=block_k)
  dense = lambda q, k, v, qr, kr: dense_attention(q, k, v, qr, kr, offsets, kv_lengths,  # noqa
                                                  scale)
  out = jax.jit(flash)(*operands)
  expected = dense(*operands)
  assert rel_err(jnp.where(real[:, :, None, None], out, 0),
                 jnp.where(real[:, :, None, None], expected, 0)) <= TOL
  with_rope = operands[3] is not None
  argnums = (0, 1, 2, 3, 4) if with_rope else (0, 1, 2)
  got = jax.jit(jax.grad(loss(flash), argnums=argnums))(*operands)
  want = jax.grad(loss(dense), argnums=argnums)(*operands)
  for name, a, e in zip(("q", "k", "v", "q_rope", "k_rope"), got, want):
    assert rel_err(a, e) <= TOL, name
  return out


# (T, block_q, block_k): blocks that divide T, that do not, and one block larger than T.
BLOCKINGS = [(37, 8, 16), (32, 16, 8), (20, 64, 64)]


@pytest.mark.parametrize("t,block_q,block_k", [
    *BLOCKINGS[:2], pytest.param(*BLOCKINGS[2], marks=pytest.mark.slow)])
def test_mla_shapes_shared_rope_key_and_narrower_values(t, block_q, block_k):
  # Per-head keys of N, one k_rope [B,S,R] shared by all heads, values of V != N.
  operands = flash_operands(2, t, t, 4, 4, 16, 24, 8)
  _check_against_dense(operands, None, None, jnp.ones((2, t), bool), block_q, block_k)


# MHA (the layer test below covers it), GQA-2, MQA
@pytest.mark.parametrize("kv_heads", [pytest.param(4, marks=pytest.mark.slow), 2, 1])
def test_grouped_query_heads(kv_heads):
  t, block_q, block_k = BLOCKINGS[0]
  operands = flash_operands(2, t, t, 4, kv_heads, 16, 12, 0)
  _check_against_dense(operands, None, None, jnp.ones((2, t), bool), block_q, block_k)


# MLA's shapes into a cache: also in the layer's ragged prefill test below.
@pytest.mark.parametrize("kv_heads,r", [pytest.param(4, 8, marks=pytest.mark.slow), (2, 0)])
def test_queries_into_a_cache_with_ragged_lengths(kv_heads, r):
  """Queries at an offset into 40 slots: rows hold 27 and 3 cached tokens, then 13 and 11 new
  ones (the last 2 of row 1 are padding); the slots past each row's length hold NaN."""
  b, t, s = 2, 13, 40
  q, k, v, q_rope, k_rope = flash_operands(b, t, s, 4, kv_heads, 16, 24, r)
  lengths, num_tokens = jnp.array([27, 3]), jnp.array([13, 11])
  kv_lengths = lengths + num_tokens
  empty = jnp.arange(s)[None, :] >= kv_lengths[:, None]  # [B,S]
  k = jnp.where(empty[:, :, None, None], jnp.nan, k)
  v = jnp.where(empty[:, :, None, None], jnp.nan, v)
  if r:
    k_rope = jnp.where(empty[:, :, None], jnp.nan, k_rope)
  real = jnp.arange(t)[None, :] < num_tokens[:, None]
  clean = lambda x: None if x is None else jnp.nan_to_num(x)  # noqa: E731  the dense reference
  dense_ops = (q, clean(k), clean(v), q_rope, clean(k_rope))
  out = jax.jit(lambda *xs: flash_attention(
      *xs[:3], q_rope=xs[3], k_rope=xs[4], scale=0.3, query_offsets=lengths,
      kv_lengths=kv_lengths, block_q=4, block_k=8))(q, k, v, q_rope, k_rope)
  assert bool(jnp.all(jnp.isfinite(out)))
  expected = dense_attention(*dense_ops, lengths, kv_lengths, 0.3)
  assert rel_err(jnp.where(real[:, :, None, None], out, 0),
                 jnp.where(real[:, :, None, None], expected, 0)) <= TOL
  _check_against_dense(dense_ops, lengths, kv_lengths, real, 4, 8)


def test_a_query_that_sees_nothing_gets_zeros_and_finite_gradients():
  q, k, v, q_rope, k_rope = flash_operands(2, 6, 6, 2, 2, 8, 8, 4)
  kv_lengths = jnp.array([6, 0])  # row 1 holds no key at all

  def f(q, k, v):
    return flash_attention(q, k, v, q_rope=q_rope, k_rope=k_rope, scale=1.0,
                           query_offsets=jnp.zeros((2,), jnp.int32), kv_lengths=kv_lengths, block_q=4, block_k=4)

  np.testing.assert_array_equal(f(q, k, v)[1], 0.0)
  grads = jax.grad(lambda *xs: jnp.sum(f(*xs) ** 2), argnums=(0, 1, 2))(q, k, v)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  np.testing.assert_array_equal(grads[0][1], 0.0)


@pytest.mark.parametrize("unrolled", [False, True])
def test_looped_and_unrolled_causal_attention_both_equal_dense(monkeypatch, unrolled):
  """Plain causal attention runs unrolled where unrolled_visits says so and as loops elsewhere:
  both paths (forced here), on blocks that do not divide T and differ for queries and keys."""
  import mla_jax.layers.flash_attention as module

  t, block_q, block_k = BLOCKINGS[0]  # 5 query blocks, 3 key blocks
  visits = module.static_visits(t, block_q, block_k, -(-t // block_k))
  monkeypatch.setattr(module, "unrolled_visits", lambda *_: visits if unrolled else None)
  operands = flash_operands(2, t, t, 4, 2, 16, 24, 8)
  _check_against_dense(operands, None, None, jnp.ones((2, t), bool), block_q, block_k)


@pytest.mark.parametrize("t,block_q,block_k,width,offsets,unrolled", [
    (64, 16, 16, 16, False, True),  # 10 pairs; their scores (40 KiB) <= the operands (48 KiB)
    (20, 64, 64, 16, False, True),  # one block, shorter than the block size
    (64, 16, 16, 8, False, False),  # the scores (40 KiB) > the operands (24 KiB)
    (80, 16, 16, 64, False, False),  # 15 pairs > UNROLL_MAX_PAIRS
    (1024, 256, 8, 64, False, False),  # 4 query blocks but 320 pairs (a long compile unrolled)
    (16, 8, 8, 64, True, False)])  # queries into a cache: traced counts
def test_which_attention_is_unrolled(t, block_q, block_k, width, offsets, unrolled):
  from mla_jax.layers.flash_attention import unrolled_visits

  q, k, v, _, _ = flash_operands(1, t, t, 1, 1, width, width, 0)
  kwargs = {"query_offsets": jnp.zeros((1,), jnp.int32)} if offsets else {}
  attend = lambda q, k, v: flash_attention(  # noqa: E731  the JAX path alone, no kernels
      q, k, v, scale=1.0, block_q=block_q, block_k=block_k, implementation="xla", **kwargs)
  jaxpr = jax.make_jaxpr(jax.grad(lambda *xs: jnp.sum(attend(*xs)), argnums=(0, 1, 2)))(q, k, v)
  assert ("scan[" not in str(jaxpr)) == unrolled  # the loops walk blocks with scans
  decided = unrolled_visits(q, k, v, None, None, kwargs.get("query_offsets"), None, block_q,
                            block_k)
  assert (decided is not None) == unrolled


@pytest.mark.parametrize("b,t,h", [(2, 64, 4), (1, 48, 2)])
def test_unrolled_attention_needs_at_most_its_operands_more_temporaries_than_looped(b, t, h):
  """unrolled_visits' promise, from XLA's memory analysis of the compiled gradient: where it
  unrolls, the extra temporaries over the looped path are at most the operands' bytes."""
  import mla_jax.layers.flash_attention as module

  operands = flash_operands(b, t, t, h, h, 32, 32, 16)
  assert module.unrolled_visits(*operands, None, None, 16, 16) is not None
  real_rule = module.unrolled_visits

  def temporaries(rule):
    module.unrolled_visits = rule
    try:
      grad = jax.jit(jax.grad(lambda *xs: jnp.sum(flash_attention(
          *xs[:3], q_rope=xs[3], k_rope=xs[4], scale=1.0, block_q=16, block_k=16,
          implementation="xla") ** 2), argnums=(0, 1, 2, 3, 4)))
      return grad.lower(*operands).compile().memory_analysis().temp_size_in_bytes
    finally:
      module.unrolled_visits = real_rule

  operand_bytes = sum(x.nbytes for x in operands)
  extra = temporaries(real_rule) - temporaries(lambda *_: None)
  assert extra <= operand_bytes, (extra, operand_bytes)


@pytest.mark.parametrize("t", [64, 80])  # unrolled (10 block pairs), looped (15)
def test_a_remat_policy_keeps_no_block_scores(t):
  """Under jax.checkpoint with dots_saveable (a model's remat policy), flash attention saves
  for the backward pass no [.., 16, 16] block of scores or probabilities, looped or unrolled:
  the unrolled forward runs inside a one-trip loop that policies do not look into."""
  import contextlib
  import io
  import re

  from jax.ad_checkpoint import print_saved_residuals  # the public form: it prints them

  from mla_jax.layers.flash_attention import unrolled_visits

  q, k, v, q_rope, k_rope = flash_operands(1, t, t, 2, 2, 16, 16, 4)
  assert (unrolled_visits(q, k, v, q_rope, k_rope, None, None, 16, 16) is None) == (t == 80)

  def loss(q, k, v):
    return jnp.sum(flash_attention(jnp.sin(q), k, v, q_rope=q_rope, k_rope=k_rope, scale=1.0,
                                   block_q=16, block_k=16, implementation="xla") ** 2)

  checkpointed = jax.checkpoint(loss, policy=jax.checkpoint_policies.dots_saveable)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    print_saved_residuals(checkpointed, q, k, v)
  shapes = [tuple(int(n) for n in dims.split(",") if n)
            for dims in re.findall(r"^\w+\[([\d,]*)\]", printed.getvalue(), re.M)]
  assert shapes and not [s for s in shapes if s[-2:] == (16, 16)], shapes


def test_unrolled_causal_attention_costs_the_visited_pairs_only():
  """Unrolled, XLA's cost analysis counts every block pair: 4 x 4 blocks of 16 cost 10/16 of
  the same attention in one 64 x 64 block (dense with a mask), gradients included."""
  q, k, v, q_rope, k_rope = flash_operands(1, 64, 64, 2, 2, 32, 32, 16)

  def flops(block):
    f = lambda *xs: jnp.sum(flash_attention(*xs[:3], q_rope=xs[3], k_rope=xs[4], scale=1.0,  # noqa
                                            block_q=block, block_k=block) ** 2)
    compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4))).lower(
        q, k, v, q_rope, k_rope).compile()
    return compiled.cost_analysis()["flops"]

  from mla_jax.layers.flash_attention import unrolled_visits

  assert unrolled_visits(q, k, v, q_rope, k_rope, None, None, 16, 16) is not None
  ratio = flops(16) / flops(64)
  assert 0.55 < ratio < 0.72, ratio  # 10/16 = 0.625 of the dots, plus elementwise work


@pytest.mark.parametrize("t,implementation", [
    (64, "xla"), (80, "xla"), (32, "pallas_tpu"), (32, "pallas_gpu")])  # unrolled, looped, kernels
def test_a_second_derivative_is_refused_by_name_on_every_path(t, implementation):
  q, k, v, q_rope, k_rope = flash_operands(1, t, t, 2, 2, 16, 16, 4)

  def loss(q):
    return jnp.sum(flash_attention(q, k, v, q_rope=q_rope, k_rope=k_rope, scale=1.0,
                                   block_q=16, block_k=16, implementation=implementation,
                                   interpret=implementation != "xla") ** 2)

  assert bool(jnp.all(jnp.isfinite(jax.grad(loss)(q))))  # first derivatives run
  with pytest.raises(NotImplementedError, match=r"first derivatives only .* attn_impl='naive'"):
    jax.grad(lambda q: jnp.sum(jax.grad(loss)(q) ** 2))(q)


# --- In the model: MLA and the baselines, naive against flash_attention ----------------------

MODELS = {
    **{name: variant(cfg, flash_block_q=8, flash_block_k=16) for name, cfg in TINY_CONFIGS.items()},
    "q_lora_split_rope_blocks_divide": variant(TINY_CONFIGS["q_lora"], rope_interleave=False,
                                               flash_block_q=8, flash_block_k=8),
    "mha": variant(TINY_CONFIGS["q_lora"], attention="mha", flash_block_q=16, flash_block_k=8),
    "gqa_4": variant(TINY_CONFIGS["q_lora"], attention="gqa", num_heads=8, num_kv_heads=4,
                     flash_block_q=8, flash_block_k=16),
    "mqa": variant(TINY_CONFIGS["no_q_lora_odd_heads"], attention="mqa", flash_block_q=8,
                   flash_block_k=16),
}


def _layer_grads(cfg, x, attn_impl):
  """(output, gradients of every parameter and of x) of one attention layer."""
  layer = attention_kind(cfg).layer(cfg)
  params = layer.init(jax.random.key(1), x)["params"]
  weights = jax.random.normal(jax.random.key(2), x.shape)

  def loss(p, x):
    y, _ = layer.apply({"params": p}, x, attn_impl=attn_impl)
    return jnp.sum(y * weights), y

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)


def _model_grads(cfg, tokens, attn_impl, remat="none"):
  """((loss, logits), gradients of every parameter) of the Transformer's next-token loss."""
  model = mla_jax.Transformer(cfg, remat=remat)
  params = model.init(jax.random.key(1), tokens)["params"]
  targets = jnp.roll(tokens, -1, axis=1)

  def loss(p):
    logits, _ = model.apply({"params": p}, tokens, attn_impl=attn_impl)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)), \
        logits

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def _assert_same(got, want):
  (value, out), grads = got
  (value_ref, out_ref), grads_ref = want
  assert rel_err(value, value_ref) <= TOL and rel_err(out, out_ref) <= TOL
  errors = jax.tree_util.tree_map(rel_err, grads, grads_ref)
  worst = max(jax.tree_util.tree_leaves(errors))
  assert worst <= TOL, errors


# q_lora's path is also in q_lora_yarn_5_heads and the split-RoPE case; GQA's grouping in
# test_grouped_query_heads and the MQA case: these two run with -m slow.
@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.slow) if name in ("q_lora", "gqa_4") else name
    for name in sorted(MODELS)])
def test_layer_output_and_every_gradient_equal_the_naive_path(name):
  cfg = MODELS[name]
  x = jax.random.normal(jax.random.key(0), (2, 37, cfg.hidden_size))
  _assert_same(_layer_grads(cfg, x, "flash_attention"), _layer_grads(cfg, x, "naive"))


@pytest.mark.parametrize("scan,remat", [
    (True, "full"),
    pytest.param(True, "none", marks=pytest.mark.slow),
    pytest.param(False, "dots_saveable", marks=pytest.mark.slow)])
def test_model_under_scan_over_layers_and_remat(scan, remat):
  cfg = variant(MODELS["q_lora_yarn_5_heads"], num_layers=3, scan_layers=scan)
  tokens = jax.random.randint(jax.random.key(0), (2, 29), 0, cfg.vocab_size)
  _assert_same(_model_grads(cfg, tokens, "flash_attention", remat),
               _model_grads(cfg, tokens, "naive", remat))


@pytest.mark.parametrize("name", ["q_lora_yarn_5_heads",
                                  pytest.param("gqa_4", marks=pytest.mark.slow)])
def test_prefill_into_a_non_empty_cache_with_ragged_rows(name):
  """A first chunk into the cache, then a second, ragged one (row 1 has 7 real tokens of 12):
  flash_attention against naive on the second chunk's logits at real positions, the cache it
  leaves, and the gradients of a loss over those logits."""
  cfg = MODELS[name]
  model = mla_jax.Transformer(cfg)
  first = jax.random.randint(jax.random.key(0), (2, 10), 0, cfg.vocab_size)
  second = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
  params = model.init(jax.random.key(2), first)["params"]
  num_tokens = jnp.array([12, 7])
  real = (jnp.arange(12)[None, :] < num_tokens[:, None])[..., None]
  _, cache = model.apply({"params": params}, first, cache=mla_jax.init_cache(cfg, 2, 40),
                         num_tokens=jnp.array([10, 4]), attn_impl="naive")

  def run(p, attn_impl):
    logits, new = model.apply({"params": p}, second, cache=cache, num_tokens=num_tokens,
                              attn_impl=attn_impl)
    return jnp.sum(jnp.where(real, logits, 0.0) ** 2), (jnp.where(real, logits, 0.0), new)

  results = {impl: jax.jit(jax.value_and_grad(run, has_aux=True), static_argnums=1)(params, impl)
             for impl in ("naive", "flash_attention")}
  (_, (logits, new)), grads = results["flash_attention"]
  (_, (logits_ref, new_ref)), grads_ref = results["naive"]
  assert rel_err(logits, logits_ref) <= TOL
  np.testing.assert_array_equal(new.lengths, [22, 11])
  held = jnp.arange(40)[None, :] < new.lengths[:, None]  # [B,S]: slots holding a token
  for layer, layer_ref in zip(new.layers, new_ref.layers):  # past layer 0 they hold rounding
    axis = layer.seq_axis
    for a, e in zip(jax.tree_util.tree_leaves(layer), jax.tree_util.tree_leaves(layer_ref)):
      keep = held.reshape((2,) + (1,) * (axis - 1) + (40,) + (1,) * (a.ndim - axis - 1))
      assert rel_err(jnp.where(keep, a, 0), jnp.where(keep, e, 0)) <= TOL
  errors = jax.tree_util.tree_map(rel_err, grads, grads_ref)
  assert max(jax.tree_util.tree_leaves(errors)) <= TOL, errors


def test_auto_picks_flash_attention_for_long_sequences_without_a_cache():
  assert resolve_attn_impl("auto", FLASH_ATTENTION_MIN_TOKENS, False) == "flash_attention"
  assert resolve_attn_impl("auto", FLASH_ATTENTION_MIN_TOKENS - 1, False) == "naive"
  assert resolve_attn_impl("auto", FLASH_ATTENTION_MIN_TOKENS, True) == "flash"
  with pytest.raises(ValueError, match="flash_attention"):
    resolve_attn_impl("flash-attention", 8, False)


# --- Memory: the compiled training step's temporaries, linear in T --------------------------

def _step_temporaries(seq_len, attn_impl):
  from mla_jax.config.run import Config, TrainConfig
  from mla_jax.train import Trainer

  model = mla_jax.ModelConfig(hidden_size=64, num_layers=1, num_heads=4, q_lora_rank=None,
                              kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                              v_head_dim=16, intermediate_size=128, max_seq_len=seq_len)
  config = Config(model=model, train=TrainConfig(batch_size=1, seq_len=seq_len, steps=10,
                                                 attn_impl=attn_impl))
  trainer = Trainer.build(config, devices=jax.devices()[:1])
  return trainer.compile_train_step().memory_analysis().temp_size_in_bytes


def test_training_step_temporaries_grow_linearly_and_are_an_eighth_of_naive_at_8k():
  flash = {t: _step_temporaries(t, "flash_attention") for t in (2048, 4096, 8192)}
  naive = _step_temporaries(8192, "naive")
  assert flash[8192] <= naive / 8
  # Linear: doubling T at most doubles them (a quadratic term would take them towards 4x).
  assert flash[4096] <= 2.1 * flash[2048] and flash[8192] <= 2.1 * flash[4096]
  # The naive step's [B,H,T,T] softmax alone is 4 x 8192^2 x 4 bytes = 1 GiB.
  assert naive >= 2**30


@pytest.mark.slow
def test_naive_training_step_temporaries_grow_quadratically():
  naive = {t: _step_temporaries(t, "naive") for t in (2048, 4096, 8192)}
  assert naive[4096] >= 3.5 * naive[2048] and naive[8192] >= 3.5 * naive[4096]
