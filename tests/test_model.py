"""The Transformer LM: naive == absorbed, prefill + decode == one full forward, masking, jit."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mla_jax
from tests.helpers import TINY_CONFIGS, YARN, rel_err, variant

TOL = 1e-5  # float32, relative to the logits' scale


def _setup(cfg, batch=2, length=12, seed=0):
  model = mla_jax.Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(seed), (batch, length), 0, cfg.vocab_size)
  params = model.init(jax.random.key(seed + 1), tokens)["params"]
  return model, params, tokens


def _config_cases():
  for name, cfg in sorted(TINY_CONFIGS.items()):
    for yarn in (False, True):
      for interleave in (True, False):
        yield pytest.param(variant(cfg, rope_scaling=YARN if yarn else None,
                                   rope_interleave=interleave),
                           id=f"{name}-{'yarn' if yarn else 'plain'}-{'inter' if interleave else 'half'}")


@pytest.mark.parametrize("cfg", list(_config_cases()))
def test_naive_equals_absorbed_on_the_same_weights(cfg):
  model, params, tokens = _setup(cfg)
  naive, _ = model.apply({"params": params}, tokens, attn_impl="naive")
  absorbed, _ = model.apply({"params": params}, tokens, attn_impl="absorbed")
  chex.assert_shape(naive, tokens.shape + (cfg.vocab_size,))
  assert naive.dtype == jnp.float32
  assert rel_err(absorbed, naive) <= TOL
  # Not vacuous: attention mixes positions, so changing the first token moves the last logits.
  changed, _ = model.apply({"params": params}, tokens.at[:, 0].add(1) % cfg.vocab_size,
                           attn_impl="absorbed")
  assert rel_err(changed[:, -1], absorbed[:, -1]) > 1e-3


def _make_steps(model):
  @functools.partial(jax.jit, donate_argnums=(2,))
  def prefill(params, tokens, cache, num_tokens):
    return model.apply({"params": params}, tokens, cache=cache, num_tokens=num_tokens)

  @functools.partial(jax.jit, donate_argnums=(2,))
  def decode(params, token, cache):
    return model.apply({"params": params}, token, cache=cache, attn_impl="absorbed")

  return prefill, decode


def _fill_with_nan(cache):
  return jax.tree_util.tree_map(
      lambda x: jnp.full_like(x, jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x, cache)


def _check_prefill_then_decode(cfg, prompt_lengths, steps, nan_tail=False, max_len=32):
  """Ragged prefill + `steps` one-token decode steps vs each sequence's own full forward."""
  batch = len(prompt_lengths)
  total = max(prompt_lengths) + steps
  model, params, seqs = _setup(cfg, batch=batch, length=total)
  seqs = np.asarray(seqs)
  prefill, decode = _make_steps(model)

  cache = mla_jax.init_cache(cfg, batch, max_len)
  if nan_tail:
    cache = _fill_with_nan(cache)
  width = max(prompt_lengths)
  prompt = np.zeros((batch, width), np.int32)  # right-padded; pad id 0 is a real token id
  for b, n in enumerate(prompt_lengths):
    prompt[b, :n] = seqs[b, :n]
  logits, cache = prefill(params, jnp.asarray(prompt), cache, jnp.asarray(prompt_lengths, jnp.int32))
  np.testing.assert_array_equal(cache.lengths, prompt_lengths)
  got = [[logits[b, :n]] for b, n in enumerate(prompt_lengths)]
  for k in range(steps):
    token = np.array([[seqs[b, n + k]] for b, n in enumerate(prompt_lengths)], np.int32)
    logits, cache = decode(params, jnp.asarray(token), cache)
    for b in range(batch):
      got[b].append(logits[b])
  np.testing.assert_array_equal(cache.lengths, np.asarray(prompt_lengths) + steps)

  for b, n in enumerate(prompt_lengths):
    full, _ = model.apply({"params": params}, jnp.asarray(seqs[b:b + 1, :n + steps]))
    assert rel_err(jnp.concatenate(got[b]), full[0]) <= TOL, f"sequence {b}"
    assert np.isfinite(np.asarray(jnp.concatenate(got[b]))).all()
  return cache


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_prefill_then_decode_equals_full_forward(name):
  _check_prefill_then_decode(TINY_CONFIGS[name], prompt_lengths=[5, 5], steps=6)


@pytest.mark.parametrize("interleave", [True, False])
def test_ragged_batch_with_nan_in_unused_cache_slots(interleave):
  cfg = variant(TINY_CONFIGS["q_lora_yarn_5_heads"], rope_interleave=interleave)
  cache = _check_prefill_then_decode(cfg, prompt_lengths=[7, 2, 4], steps=5, nan_tail=True)
  # The slots past each sequence's length still hold NaN: never written, and never read.
  c_kv = np.asarray(cache.layers[0].c_kv)
  assert np.isnan(c_kv[1, 2 + 5 + 7:]).all() and np.isfinite(c_kv[1, :2 + 5]).all()


@pytest.mark.parametrize("attention, kv_heads", [("mha", None), ("gqa", 2), ("mqa", None)])
def test_baselines_prefill_then_decode_equals_full_forward(attention, kv_heads):
  cfg = variant(TINY_CONFIGS["q_lora"], attention=attention, num_kv_heads=kv_heads)
  _check_prefill_then_decode(cfg, prompt_lengths=[6, 3], steps=4, nan_tail=True)


def test_chunked_prefill_into_a_non_empty_cache():
  cfg = TINY_CONFIGS["no_q_lora_odd_heads"]
  model, params, tokens = _setup(cfg, batch=2, length=12)
  cache = mla_jax.init_cache(cfg, 2, 16)
  first, cache = model.apply({"params": params}, tokens[:, :5], cache=cache)
  for impl in ("naive", "absorbed"):
    second, _ = model.apply({"params": params}, tokens[:, 5:], cache=cache, attn_impl=impl)
    full, _ = model.apply({"params": params}, tokens)
    assert rel_err(jnp.concatenate([first, second], axis=1), full) <= TOL, impl


def test_decode_step_traces_once_for_a_fixed_shape():
  cfg = TINY_CONFIGS["q_lora"]
  model, params, tokens = _setup(cfg, batch=2, length=4)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, token, cache):
    return model.apply({"params": params}, token, cache=cache, attn_impl="absorbed")

  cache = mla_jax.init_cache(cfg, 2, 16)
  _, cache = model.apply({"params": params}, tokens, cache=cache)
  for i in range(5):
    _, cache = step(params, tokens[:, i % 4:i % 4 + 1], cache)
  assert np.asarray(cache.lengths).tolist() == [9, 9]
  with pytest.raises(AssertionError):  # the check is live: a new shape would trace again
    step(params, tokens[:1, :1], mla_jax.init_cache(cfg, 1, 16))


def test_bf16_model_with_bf16_cache_tracks_float32():
  cfg = TINY_CONFIGS["q_lora"]
  model, params, tokens = _setup(cfg, batch=2, length=10)
  ref, _ = model.apply({"params": params}, tokens)
  model16 = mla_jax.Transformer(variant(cfg, dtype="bfloat16"))
  cache = mla_jax.init_cache(model16.config, 2, 16)
  assert cache.layers[0].dtype == jnp.bfloat16  # stored as its uint16 bit patterns
  assert cache.layers[0].c_kv.dtype == jnp.uint16 and cache.layers[0].c_kv.itemsize == 2
  prefix, cache = model16.apply({"params": params}, tokens[:, :6], cache=cache)
  steps = [prefix]
  for i in range(6, 10):
    logits, cache = model16.apply({"params": params}, tokens[:, i:i + 1], cache=cache)
    steps.append(logits)
  assert rel_err(jnp.concatenate(steps, axis=1), ref) < 5e-2  # bf16: ~3 significant digits


@pytest.mark.parametrize("case, message", [
    ("id_too_large", r"token ids must be in \[0, vocab_size=97\)"),
    ("negative_id", r"token ids must be in \[0, vocab_size=97\)"),
    ("float_tokens", "integer array"),
    ("too_long", r"T=65 .*model.max_seq_len \(64\)"),
    ("cache_overflow", "cache overflow"),
    ("batch_mismatch", "does not match the cache's batch"),
    ("num_tokens_without_cache", "num_tokens is only meaningful with a cache"),
    ("num_tokens_out_of_range", r"num_tokens must be in \[0, T=2\]"),
])
def test_bad_inputs_are_refused_before_compute(case, message):
  cfg = TINY_CONFIGS["q_lora"]
  model, params, _ = _setup(cfg, batch=2, length=4)
  ok = jnp.zeros((2, 2), jnp.int32)
  cache = mla_jax.init_cache(cfg, 2, 4)
  calls = {
      "id_too_large": lambda: model.apply({"params": params}, ok.at[0, 1].set(97)),
      "negative_id": lambda: model.apply({"params": params}, ok.at[1, 0].set(-1)),
      "float_tokens": lambda: model.apply({"params": params}, ok.astype(jnp.float32)),
      "too_long": lambda: model.apply({"params": params}, jnp.zeros((1, 65), jnp.int32)),
      "cache_overflow": lambda: model.apply(
          {"params": params}, ok, cache=cache.replace(lengths=jnp.array([1, 3], jnp.int32))),
      "batch_mismatch": lambda: model.apply({"params": params}, ok[:1], cache=cache),
      "num_tokens_without_cache": lambda: model.apply({"params": params}, ok,
                                                      num_tokens=jnp.array([1, 2])),
      "num_tokens_out_of_range": lambda: model.apply({"params": params}, ok, cache=cache,
                                                     num_tokens=jnp.array([3, 1])),
  }
  with pytest.raises(ValueError, match=message):
    calls[case]()
