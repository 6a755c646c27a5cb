"""The serving engine: greedy completions equal `generate` on each prompt alone (arrival orders,
prefix sharing on and off, forced preemption, int8 pages, a mesh of 8 devices), seeded sampling
per request, a bounded number of compiled programs, and every page back after every request."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.model import Transformer
from mla_jax.sampling import generate
from mla_jax.serving import Engine, InvalidRequest, SamplingParams
from mla_jax.serving import runner as runner_module

from tests.helpers import TINY_CONFIGS, variant

CFG = variant(TINY_CONFIGS["q_lora"], decode_block_size=8, max_seq_len=48)
HEADER = [7, 3, 9, 1, 4, 4, 8, 2, 6, 5, 11, 12]  # a shared "system prompt": 3 pages of 4


@functools.lru_cache(maxsize=None)
def _params(cache_dtype=None):
  model = Transformer(variant(CFG, cache_dtype=cache_dtype))
  return model, model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]


def _requests(n: int = 52, seed: int = 0):
  """n (prompt, max_tokens): lengths from a few values (so generate compiles a few programs),
  half of them after the shared header."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    body = rng.integers(0, CFG.vocab_size, int(rng.choice([1, 3, 6, 9]))).tolist()
    prompt = (HEADER + body) if i % 2 else body + [int(rng.integers(0, 97))] * 4
    out.append((prompt, int(rng.choice([2, 5, 9]))))
  return out


@functools.lru_cache(maxsize=None)
def _expected(cache_dtype=None, n: int = 52) -> tuple:
  model, params = _params(cache_dtype)
  return tuple(tuple(generate(model, params, [p], max_new_tokens=m)[0, len(p):].tolist())
               for p, m in _requests(n))


def _run(engine: Engine, requests, order, steps_between: int = 0, exact_pages: bool = True
         ) -> dict:
  """Adds the requests in `order`, stepping `steps_between` times after each; runs to the end.
  Checks after every step that each running sequence holds exactly the pages its tokens need
  (with exact_pages=False at least those: a speculative round reserves its drafts' too), and
  that the pool counts every holder of a page."""
  done, ids = {}, {}

  def step():
    for out in engine.step():
      if out.finished:
        done[out.request_id] = out.completion
    shared = {}
    for seq in engine._running:
      needed = -(-seq.cached // engine.page_size)
      if seq.cached:
        assert len(seq.pages) == needed or (not exact_pages and len(seq.pages) > needed), (
            seq.cached, seq.pages)
      for page in seq.pages:
        shared[page] = shared.get(page, 0) + 1
    for page, users in shared.items():
      assert engine.pool.refcount(page) == users
    assert engine.pool.num_used == len(shared)

  for i in order:
    prompt, max_tokens = requests[i]
    ids[engine.add_request(prompt, SamplingParams(max_tokens=max_tokens))] = i
    for _ in range(steps_between):
      step()
  while engine.has_unfinished():
    step()
  assert engine.stats["pages_free"] == engine.num_pages and engine.pool.num_used == 0
  return {ids[r]: tuple(c.tokens) for r, c in done.items()}


def _engine(cache_dtype=None, **kwargs) -> Engine:
  model, params = _params(cache_dtype)
  options = dict(max_seqs=8, page_size=4, prefill_chunk=8, prefill_rows=2)
  options.update(kwargs)
  return Engine(model, params, **options)


@pytest.mark.parametrize("prefix_sharing,order,steps_between", [
    (True, "forward", 0), (False, "reverse", 1), (True, "shuffled", 2)])
def test_greedy_equals_generate_alone(prefix_sharing, order, steps_between):
  requests = _requests()
  indices = list(range(len(requests)))
  if order == "reverse":
    indices.reverse()
  elif order == "shuffled":
    np.random.default_rng(3).shuffle(indices)
  engine = _engine(prefix_sharing=prefix_sharing)
  got = _run(engine, requests, indices, steps_between)
  expected = _expected()
  assert [got[i] for i in range(len(requests))] == list(expected)
  if steps_between == 0:  # all at once: every row is used
    assert engine.stats["peak_running"] == 8


def test_prefix_sharing_shares_the_header_pages():
  engine = _engine()
  model, params = _params()
  first = engine.add_request(HEADER + [1, 2], SamplingParams(max_tokens=3))
  engine.step()
  engine.step()  # prefill_chunk 8: the 14-token prompt is in after two steps
  second = engine.add_request(HEADER + [5], SamplingParams(max_tokens=3))
  engine.step()
  a, b = (next(s for s in engine._running if s.request_id == r) for r in (first, second))
  assert a.pages[:3] == b.pages[:3]  # the header's three full pages, stored once
  assert all(engine.pool.refcount(p) == 2 for p in a.pages[:3])
  while engine.has_unfinished():
    engine.step()
  assert engine.pool.num_used == 0


def test_a_fully_cached_prompt_copies_its_last_page_before_writing():
  """Same prompt twice: the second matches every page; its last token is recomputed into a
  copy of the last shared page (copy-on-write), and both complete like generate."""
  engine = _engine()
  model, params = _params()
  prompt = HEADER[:8]
  want = generate(model, params, [prompt], max_new_tokens=4)[0, 8:].tolist()
  got = [c.tokens for c in engine.generate([prompt], SamplingParams(max_tokens=4))]
  got += [c.tokens for c in engine.generate([prompt], SamplingParams(max_tokens=4))]
  assert got == [want, want]
  assert engine.pool.num_used == 0


def test_preemption_by_a_tiny_pool_keeps_every_completion_exact():
  requests = _requests()
  engine = _engine(num_pages=12)  # room for ~2 long sequences: most get preempted
  got = _run(engine, requests, range(len(requests)))
  assert [got[i] for i in range(len(requests))] == list(_expected())
  assert engine.stats["preemptions"] > 0


@pytest.mark.slow  # about 45 s: the kernel is interpreted, and compiled in both step programs
def test_the_pallas_decode_kernel_serves_the_same_tokens():
  """Engine(decode_kernel='pallas'): the paged kernel (on CPU the TPU kernel, interpreted) in
  both step programs, int8 pages; the same completions as generate alone."""
  requests = _requests(2)
  model, params = _params("int8")
  model = model.clone(config=variant(model.config, decode_kernel_block_size=8))  # 2 pages
  engine = Engine(model, params, max_seqs=2, page_size=4, prefill_chunk=8, prefill_rows=1,
                  decode_kernel="pallas")
  assert engine.runner.model.config.decode_kernel == "pallas"
  got = _run(engine, requests, range(len(requests)))
  assert [got[i] for i in range(len(requests))] == list(_expected("int8", 2))


def test_int8_pages_equal_generate_with_an_int8_cache():
  requests = _requests()
  engine = _engine("int8")
  got = _run(engine, requests, range(len(requests)))
  assert [got[i] for i in range(len(requests))] == list(_expected("int8"))


def test_on_a_mesh_of_8_devices():
  from mla_jax.sharding import make_mesh

  requests = _requests()
  engine = _engine(mesh=make_mesh({"data": 8, "fsdp": 1, "tensor": 1, "sequence": 1}),
                   num_pages=64)
  got = _run(engine, requests, range(len(requests)))
  assert [got[i] for i in range(len(requests))] == list(_expected())


def test_seeded_sampling_is_the_same_whatever_the_batch_mates():
  sampling = SamplingParams(max_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=42)
  prompt = [5, 6, 7]
  alone = _engine().generate([prompt], sampling)[0].tokens
  crowd = _requests(12, seed=5)
  engine = _engine()
  mates = [SamplingParams(max_tokens=m, temperature=1.0, seed=i) for i, (_, m) in
           enumerate(crowd)]
  results = engine.generate([p for p, _ in crowd] + [prompt], mates + [sampling])
  assert results[-1].tokens == alone
  other_seed = _engine().generate([prompt], SamplingParams(
      max_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=43))[0].tokens
  assert other_seed != alone


@pytest.mark.parametrize("num_requests", [pytest.param(20, marks=pytest.mark.slow), 200])
def test_a_serving_run_compiles_a_fixed_number_of_programs(num_requests):
  rng = np.random.default_rng(9)
  before = dict(runner_module.TRACES)
  engine = _engine(max_seqs=20, prefill_rows=3, prefill_chunk=40)  # compiles its programs here
  # decode rows 8, 16, 20; prefill rows 1, 2, 3 x chunk widths 16, 32, 40
  assert engine.decode_buckets == (8, 16, 20) and engine.prefill_row_buckets == (1, 2, 3)
  assert engine.prefill_width_buckets == (16, 32, 40) and engine.num_programs == 3 + 9 + 1
  traced = {k: runner_module.TRACES[k] - before[k] for k in before}
  assert traced["step"] == 12  # the copy may come from jax's cache: an earlier engine's shape
  assert traced["copy"] <= 1
  before = dict(runner_module.TRACES)
  prompts = [rng.integers(0, 97, int(rng.integers(1, 40))).tolist() for _ in range(num_requests)]
  sampling = [SamplingParams(max_tokens=int(rng.integers(1, 8))) for _ in prompts]
  completions = engine.generate(prompts, sampling)
  assert [len(c.tokens) for c in completions] == [s.max_tokens for s in sampling]
  assert runner_module.TRACES == before  # nothing more, whatever the requests


def test_cancelled_and_failed_requests_free_their_pages(monkeypatch):
  engine = _engine()
  ids = [engine.add_request(p, SamplingParams(max_tokens=m)) for p, m in _requests(10)]
  engine.step()
  engine.step()
  engine.cancel(ids[0])
  engine.cancel(ids[9])  # still waiting: max_seqs is 8
  finished = {}
  for out in engine.step():
    if out.finished:
      finished[out.request_id] = out.completion
  assert finished[ids[0]].finish_reason == "cancelled"
  assert finished[ids[9]].finish_reason == "cancelled" and finished[ids[9]].tokens == []
  real_step = engine.runner.step
  monkeypatch.setattr(engine.runner, "step", lambda **rows: (_ for _ in ()).throw(
      RuntimeError("device lost")))
  for out in engine.step():
    if out.finished:
      finished[out.request_id] = out.completion
  failed = [c for c in finished.values() if c.finish_reason == "error"]
  assert failed and all("device lost" in c.error for c in failed)
  monkeypatch.setattr(engine.runner, "step", real_step)
  while engine.has_unfinished():
    for out in engine.step():
      if out.finished:
        finished[out.request_id] = out.completion
  assert len(finished) == 10
  assert engine.pool.num_used == 0 and engine.stats["pages_free"] == engine.num_pages


@pytest.mark.parametrize("prompt,sampling,message,param", [
    ([], SamplingParams(), "prompt is empty", "prompt"),
    ([97], SamplingParams(), "vocab_size=97", "prompt"),
    ([1] * 40, SamplingParams(max_tokens=9), "exceeds model.max_seq_len", "max_tokens"),
    ([1] * 48, SamplingParams(max_tokens=1), "exceeds model.max_seq_len", "prompt"),
    ([1], SamplingParams(max_tokens=0), "max_tokens=0", "max_tokens"),
    ([1], SamplingParams(temperature=float("nan")), "temperature=nan", "temperature"),
    ([1], SamplingParams(top_k=0), "top_k=0", "top_k"),
    ([1], SamplingParams(top_p=1.5), "top_p=1.5", "top_p"),
    ([1], SamplingParams(seed=1.5), "seed=1.5", "seed"),
    ("text", SamplingParams(), "no tokenizer", "prompt"),
    ([1], SamplingParams(stop_token_ids=(500,)), "stop_token_ids=500", "stop_token_ids"),
])
def test_add_request_refuses_bad_input_before_queueing(prompt, sampling, message, param):
  engine = _engine()
  with pytest.raises(InvalidRequest, match=message) as caught:
    engine.add_request(prompt, sampling)
  assert caught.value.param == param
  assert not engine.has_unfinished()


def test_an_unknown_decode_kernel_is_refused_before_compiling():
  model, params = _params()
  with pytest.raises(ValueError, match="model.decode_kernel='fused' is invalid: allowed: auto"):
    Engine(model, params, decode_kernel="fused")


@pytest.mark.parametrize("options,message", [
    (dict(num_pages=10**12), r"num_pages=1000000000000 is invalid: its pool of "
                             r"1,000,000,000,000 pages needs .* GiB per device, more than"),
    (dict(cache_budget_bytes=2**50), r"cache_budget_bytes=1125899906842624 is invalid"),
    (dict(page_size=10**9), r"page_size=1000000000 is invalid: must be at most "
                            r"model.max_seq_len \(48\)"),
])
def test_sizes_that_cannot_work_are_refused_before_anything_is_allocated(options, message):
  model, params = _params()
  with pytest.raises(ValueError, match=message):
    Engine(model, params, max_seqs=2, **options)


def test_a_request_larger_than_the_pool_is_refused():
  engine = _engine(num_pages=3)
  with pytest.raises(ValueError, match="num_pages=3"):
    engine.add_request([1] * 10, SamplingParams(max_tokens=4))


def test_stream_yields_the_completion_and_stop_tokens_end_it():
  model, params = _params()
  want = generate(model, params, [[4, 5, 6]], max_new_tokens=6)[0, 3:].tolist()
  engine = _engine()
  assert list(engine.stream([4, 5, 6], SamplingParams(max_tokens=6))) == want
  stop = want[2]
  got = engine.generate([[4, 5, 6]], SamplingParams(max_tokens=6, stop_token_ids=(stop,)))[0]
  assert got.tokens == want[:want.index(stop) + 1] and got.finish_reason == "stop"


def test_streams_read_in_turn_and_requests_stepped_by_hand_each_get_all_their_tokens():
  """Two streams read alternately, a request added by hand and collected with step(), and a
  generate() in between: every request gets exactly its own tokens, none lost to another's
  steps, and nothing spins once a stream's request has finished in another's step."""
  model, params = _params()
  prompts = {"a": [3, 1, 4], "b": [2, 7, 1, 8], "c": [9, 9, 2], "d": [5, 6]}
  want = {k: generate(model, params, [p], max_new_tokens=6)[0, len(p):].tolist()
          for k, p in prompts.items()}
  engine = _engine()
  first, second = (engine.stream(prompts[k], SamplingParams(max_tokens=6)) for k in "ab")
  by_hand = engine.add_request(prompts["c"], SamplingParams(max_tokens=6))
  got = {"a": [], "b": []}
  for _ in range(3):  # alternate: each next() may run steps that produce the other's tokens
    got["a"].append(next(first))
    got["b"].append(next(second))
  assert engine.generate([prompts["d"]], SamplingParams(max_tokens=6))[0].tokens == want["d"]
  got["a"] += list(first)
  got["b"] += list(second)
  assert got == {"a": want["a"], "b": want["b"]}
  collected = []
  while engine.has_unfinished() or not collected or not collected[-1].finished:
    collected += [out for out in engine.step() if out.request_id == by_hand]
  assert [t for out in collected for t in out.new_tokens] == want["c"]
  assert engine.stats["pages_free"] == engine.num_pages


def test_closing_a_stream_early_cancels_its_request_and_frees_its_pages():
  engine = _engine()
  tokens = engine.stream([4, 5, 6], SamplingParams(max_tokens=20))
  next(tokens)
  tokens.close()
  assert not engine.has_unfinished() and engine.stats["pages_free"] == engine.num_pages


def test_an_nnx_model_serves_the_same_tokens():
  from flax import nnx

  from mla_jax.nnx import Transformer as NNXTransformer, load_params

  model, params = _params()
  nnx_model = NNXTransformer(CFG, rngs=nnx.Rngs(1))
  load_params(nnx_model, params)
  prompt = [3, 1, 4, 1, 5]
  want = generate(model, params, [prompt], max_new_tokens=5)[0, 5:].tolist()
  engine = Engine(nnx_model, max_seqs=2, page_size=4)
  assert engine.generate([prompt], SamplingParams(max_tokens=5))[0].tokens == want
