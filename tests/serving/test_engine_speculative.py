"""The serving engine with speculative=k: greedy completions are plain greedy `generate`'s on
each prompt alone (prefix sharing, forced preemption, int8 pages), seeded sampling does not
depend on the batch mates, pages all come back, and a model without an MTP module is refused."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.model import Transformer
from mla_jax.sampling import generate
from mla_jax.serving import Engine, SamplingParams
from tests.helpers import TINY_CONFIGS, variant
from tests.serving.test_engine import HEADER, _requests, _run
from tests.test_speculative import _echo_mtp

CFG = variant(TINY_CONFIGS["q_lora"], decode_block_size=8, max_seq_len=48, num_mtp_layers=1)


@functools.lru_cache(maxsize=None)
def _params(cache_dtype=None):
  model = Transformer(variant(CFG, cache_dtype=cache_dtype))
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  # Sharper logits than at init (greedy not decided by float noise), and an MTP module whose
  # drafts are kept whenever the model repeats a token, so rounds keep and refuse drafts.
  return model, _echo_mtp(jax.tree_util.tree_map(lambda p: p * 4 if p.ndim >= 2 else p, params))


@functools.lru_cache(maxsize=None)
def _expected(cache_dtype=None, n: int = 24) -> tuple:
  model, params = _params(cache_dtype)
  return tuple(tuple(generate(model, params, [p], max_new_tokens=m)[0, len(p):].tolist())
               for p, m in _requests(n))


def _engine(cache_dtype=None, **kwargs) -> Engine:
  model, params = _params(cache_dtype)
  options = dict(max_seqs=8, page_size=4, prefill_chunk=8, prefill_rows=2, speculative=2)
  options.update(kwargs)
  return Engine(model, params, **options)


@pytest.mark.slow
@pytest.mark.parametrize("cache_dtype, options", [
    (None, {}), (None, dict(prefix_sharing=False, speculative=4)), ("int8", {}),
    (None, dict(num_pages=14))], ids=["float", "no_sharing_k4", "int8", "preemption"])
def test_greedy_completions_are_plain_greedy(cache_dtype, options):
  requests = _requests(24)
  order = np.random.default_rng(3).permutation(len(requests))
  engine = _engine(cache_dtype, **options)
  got = _run(engine, requests, order, steps_between=1, exact_pages=False)
  assert [got[i] for i in range(len(requests))] == list(_expected(cache_dtype))
  stats = engine.stats
  assert 0 < stats["drafts_kept"] < stats["drafts_verified"]
  if "num_pages" in options:
    assert stats["preemptions"] > 0


@pytest.mark.slow
def test_a_shared_prefix_resumes_one_token_early():
  """The second prompt shares the header's pages; its MTP entry at their last position is
  recomputed (the token after it differs), copying that page first."""
  engine = _engine()
  model, params = _params()
  prompts = [HEADER + [1, 2], HEADER + [5]]
  want = [generate(model, params, [p], max_new_tokens=6)[0, len(p):].tolist() for p in prompts]
  got = [c.tokens for c in engine.generate(prompts[:1], SamplingParams(max_tokens=6))]
  before = engine.stats["prefill_tokens"]
  engine.add_request(prompts[1], SamplingParams(max_tokens=6))
  engine.step()
  assert engine.stats["prefill_tokens"] - before == 2  # 12 shared tokens, resumed at the 12th
  while engine.has_unfinished():
    for out in engine.step():
      if out.finished:
        got.append(out.completion.tokens)
  assert got == want and engine.pool.num_used == 0


@pytest.mark.slow
def test_seeded_sampling_is_the_same_whatever_the_batch_mates():
  sampling = SamplingParams(max_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=42)
  prompt = [5, 6, 7]
  alone = _engine().generate([prompt], sampling)[0].tokens
  crowd = _requests(10, seed=5)
  mates = [SamplingParams(max_tokens=m, temperature=1.0, seed=i) for i, (_, m) in
           enumerate(crowd)]
  results = _engine().generate([p for p, _ in crowd] + [prompt], mates + [sampling])
  assert results[-1].tokens == alone and len(alone) == 8
  other = _engine().generate([prompt], SamplingParams(max_tokens=8, temperature=0.9, top_k=20,
                                                      top_p=0.9, seed=43))[0].tokens
  assert other != alone


def test_a_model_without_mtp_is_refused():
  model = Transformer(variant(CFG, num_mtp_layers=0))
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  with pytest.raises(ValueError, match=r"no multi-token-prediction module"):
    Engine(model, params, speculative=2)
