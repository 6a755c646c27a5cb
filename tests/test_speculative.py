"""Self-speculative decoding (mla_jax/speculative.py): greedy is plain greedy token for token
(k = 1, 2, 4, ragged rows, rows ending or hitting EOS mid-draft, float and int8 caches); sampling
follows the model's distribution (chi-square against the exact one, as plain sampling does);
seeded runs repeat; one compiled loop."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

import mla_jax
from mla_jax import speculative
from mla_jax.sampling import generate
from tests.helpers import TINY_CONFIGS, variant

CFG = variant(TINY_CONFIGS["q_lora"], vocab_size=61, num_mtp_layers=1)
PROMPTS = [[5, 9, 2, 44, 7, 1, 30], [3], [12, 12, 40, 8]]


def _model(cfg=CFG, seed=0):
  model = mla_jax.Transformer(cfg)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
  # Sharper logits than at init, so greedy paths are not decided by float noise.
  return model, jax.tree_util.tree_map(lambda p: p * 4 if p.ndim >= 2 else p, params)


def _echo_mtp(params):
  """An MTP module whose draft is the model's own prediction one position back (eh_proj passes
  the hidden state through, the block adds nothing): right whenever the model repeats a token,
  so rounds keep drafts as well as reject them."""
  d = params["embed_tokens"].shape[1]
  mtp = jax.tree_util.tree_map(jnp.zeros_like, params["mtp_layers_0"])
  for norm in ("enorm", "hnorm", "input_layernorm", "post_attention_layernorm"):
    mtp[norm]["scale"] = jnp.ones((d,))
  mtp["shared_head"]["norm"]["scale"] = params["norm"]["scale"]
  mtp["eh_proj"] = jnp.concatenate([jnp.zeros((d, d)), jnp.eye(d)])
  return {**params, "norm": {"scale": jnp.ones((d,))}, "mtp_layers_0": mtp}


@pytest.fixture(scope="module")
def models():
  model, params = _model()
  return model, {"random": params, "echo": _echo_mtp(params)}


@pytest.mark.parametrize("k", [pytest.param(1, marks=pytest.mark.slow), 2,
                               pytest.param(4, marks=pytest.mark.slow)])
def test_greedy_is_plain_greedy_token_for_token(models, k):
  model, variants = models
  for name, params in variants.items():
    expected, expected_lengths = generate(model, params, PROMPTS, max_new_tokens=13,
                                          return_lengths=True)
    out, lengths, stats = generate(model, params, PROMPTS, max_new_tokens=13, speculative=k,
                                   return_lengths=True, return_stats=True)
    np.testing.assert_array_equal(out, expected, err_msg=f"{name}, k={k}")
    np.testing.assert_array_equal(lengths, expected_lengths)
    assert stats.new_tokens == 3 * 13 and stats.reached.shape == (k,)
    assert (stats.accepted <= stats.reached).all()
    assert stats.row_rounds <= 3 * 12 and stats.tokens_per_round >= 1
    if name == "echo":  # drafts kept and drafts refused both happened
      assert 0 < stats.accepted[0] < stats.reached[0], stats


@pytest.mark.slow
def test_greedy_with_an_int8_cache_and_rows_that_stop_mid_draft(models):
  model, variants = models
  params = variants["echo"]
  int8 = mla_jax.Transformer(dataclasses.replace(CFG, cache_dtype="int8"))
  plain = generate(int8, params, PROMPTS, max_new_tokens=11)
  # An EOS the plain run meets mid-sequence ends that row in the speculative run too.
  eos = int(plain[0, 7 + 5])
  expected, expected_lengths = generate(int8, params, PROMPTS, max_new_tokens=11, eos_id=eos,
                                        pad_id=60, return_lengths=True)
  assert (expected_lengths < np.array([7, 1, 4]) + 11).any()  # some row did stop early
  for k in (2, 4):
    np.testing.assert_array_equal(generate(int8, params, PROMPTS, max_new_tokens=11,
                                           speculative=k), plain)
    out, lengths = generate(int8, params, PROMPTS, max_new_tokens=11, eos_id=eos, pad_id=60,
                            speculative=k, return_lengths=True)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(lengths, expected_lengths)


@pytest.mark.slow
def test_one_compiled_loop_whatever_the_rounds(models):
  model, variants = models
  speculative._decode_loop.clear_cache()
  generate(model, variants["random"], PROMPTS, max_new_tokens=9, speculative=2)
  generate(model, variants["echo"], [[1] * 7, [2], [3, 3, 3, 3]], max_new_tokens=9,
           speculative=2)  # other accepted counts, the same shapes
  assert speculative._decode_loop._cache_size() == 1


SMALL = variant(CFG, vocab_size=5)


def _exact_joint(model, params, prompt, steps, top_k=None):
  """P(t_1 .. t_steps | prompt) for every sequence of `steps` tokens, by teacher forcing, with
  the sampler's top-k (renormalised at each step): (probabilities [V^s], sequences [V^s, s])."""
  v = model.config.vocab_size
  sequences = np.array(list(itertools.product(range(v), repeat=steps)))  # [V^s, s]
  tokens = np.concatenate([np.tile(prompt, (len(sequences), 1)), sequences], axis=1)
  logits, _ = model.apply({"params": params}, jnp.asarray(tokens))
  logits = np.asarray(logits[:, len(prompt) - 1:-1], np.float64)  # [V^s, s, V]
  if top_k is not None:
    logits = np.where(logits >= np.sort(logits, axis=-1)[..., -top_k:-top_k + 1], logits, -np.inf)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, sequences[..., None], axis=-1)[..., 0]
  return np.exp(picked.sum(axis=1)), sequences


def _chi_square_p(samples, probs, sequences):
  """p-value of the samples' sequence counts against probs, cells with an expected count
  below 5 pooled (Cochran's rule); a sequence of probability 0 (outside top-k) must not occur."""
  index = {tuple(s): i for i, s in enumerate(sequences)}
  observed = np.bincount([index[tuple(s)] for s in samples], minlength=len(probs))
  expected = probs * len(samples)
  assert observed[expected == 0].sum() == 0, "sampled a sequence the sampler excludes"
  observed, expected = observed[expected > 0], expected[expected > 0]
  small = expected < 5
  if small.any():
    observed = np.append(observed[~small], observed[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
  chi2 = float(((observed - expected) ** 2 / expected).sum())
  return scipy_stats.chi2.sf(chi2, len(observed) - 1)


@pytest.mark.parametrize("options", [pytest.param(dict(temperature=1.0), marks=pytest.mark.slow),
                                     dict(temperature=0.7, top_k=3)])
def test_sampling_follows_the_models_distribution(options):
  """4,000 rows of 3 new tokens: the frequencies of the 125 possible sequences against the
  model's own probabilities (with the sampler's temperature and top-k), for plain sampling and
  for k = 2 drafts from an MTP module that often disagrees with the model (drafts refused and
  redrawn from the residual). A correct sampler fails about 1 run in 1,000."""
  model, params = _model(SMALL, seed=3)
  params = jax.tree_util.tree_map(lambda p: p / 2 if p.ndim >= 2 else p, params)  # mixed odds
  prompt = [1, 2, 0]
  scaled = dict(params, lm_head=params["lm_head"] / options["temperature"])
  probs, sequences = _exact_joint(model, scaled, prompt, 3, options.get("top_k"))
  rows = [prompt] * 4000
  plain = generate(model, params, rows, max_new_tokens=3, seed=11, **options)
  assert _chi_square_p(plain[:, 3:], probs, sequences) > 1e-3
  drafted, stats = generate(model, params, rows, max_new_tokens=3, seed=11, speculative=2,
                            return_stats=True, **options)
  assert _chi_square_p(drafted[:, 3:], probs, sequences) > 1e-3
  assert 0.1 < stats.acceptance[0] < 0.95, stats  # both kinds of round happened


@pytest.mark.slow
def test_seeded_runs_repeat(models):
  model, variants = models
  options = dict(max_new_tokens=10, temperature=0.9, speculative=3)
  a = generate(model, variants["echo"], PROMPTS, seed=4, **options)
  b = generate(model, variants["echo"], PROMPTS, seed=4, **options)
  c = generate(model, variants["echo"], PROMPTS, seed=5, **options)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("value, message", [
    (-1, r"^speculative=-1 is invalid: must be a positive integer"),
    (1.5, r"^speculative=1\.5 is invalid"),
    (True, r"^speculative=True is invalid"),
])
def test_bad_speculative_values_are_refused(models, value, message):
  model, variants = models
  with pytest.raises(ValueError, match=message):
    generate(model, variants["random"], PROMPTS, max_new_tokens=3, speculative=value)


def test_a_model_without_mtp_cannot_draft():
  model, params = _model(variant(CFG, num_mtp_layers=0))
  with pytest.raises(ValueError, match=r"^the model has no multi-token-prediction module "
                                       r"\(model\.num_mtp_layers=0\), so it cannot draft"):
    generate(model, params, PROMPTS, max_new_tokens=3, speculative=2)
  with pytest.raises(ValueError, match=r"^return_stats=True needs speculative=k"):
    generate(model, params, PROMPTS, max_new_tokens=3, return_stats=True)
