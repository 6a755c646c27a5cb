"""Generation: greedy equals teacher forcing, samplers, compile-once, bad inputs, the CLI."""

import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mla_jax
from mla_jax import sampling
from mla_jax.config import load_config
from mla_jax.sampling import Sampler, generate, stream
from tests.helpers import TINY_CONFIGS, variant

CFG = variant(TINY_CONFIGS["q_lora_yarn_5_heads"], vocab_size=61)


@pytest.fixture(scope="module")
def model_and_params():
  model = mla_jax.Transformer(CFG)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  # Sharper logits than at init, so greedy paths are not decided by float noise.
  params = jax.tree_util.tree_map(lambda p: p * 4 if p.ndim >= 2 else p, params)
  return model, params


PROMPTS = [[5, 9, 2, 44, 7, 1, 30], [3], [12, 12, 40, 8]]


def test_greedy_equals_teacher_forced_argmax_and_rows_are_independent(model_and_params):
  model, params = model_and_params
  out, lengths = generate(model, params, PROMPTS, max_new_tokens=12, return_lengths=True)
  assert out.shape == (3, 7 + 12) and out.dtype == np.int32
  np.testing.assert_array_equal(lengths, [7 + 12, 1 + 12, 4 + 12])
  for b, prompt in enumerate(PROMPTS):
    row = out[b, :lengths[b]]
    assert row[:len(prompt)].tolist() == prompt
    assert (out[b, lengths[b]:] == 0).all()  # right padding with pad_id
    logits, _ = model.apply({"params": params}, jnp.asarray(row[None]))  # teacher forcing
    predicted = np.asarray(jnp.argmax(logits[0], axis=-1))
    np.testing.assert_array_equal(row[len(prompt):], predicted[len(prompt) - 1:-1])
    alone = generate(model, params, [prompt], max_new_tokens=12)
    np.testing.assert_array_equal(alone[0], row)
  # An int array of equal-length prompts works the same way, once it says they are all real.
  same = generate(model, params, np.array([PROMPTS[0], PROMPTS[0]]), max_new_tokens=12,
                  lengths=[7, 7])
  np.testing.assert_array_equal(same[1], out[0])


def test_greedy_tokens_are_unchanged_by_the_pallas_decode_kernel(model_and_params):
  """decode_kernel='pallas' (on CPU the TPU kernel, interpreted) over a ragged batch, blocks of
  8 tokens and two KV splits: the same greedy tokens as the XLA loop (YaRN is on in CFG)."""
  model, params = model_and_params
  model = model.clone(config=variant(CFG, decode_kernel_block_size=8, decode_kv_splits=2))
  want = generate(model, params, PROMPTS, max_new_tokens=6, decode_kernel="xla")
  got = generate(model, params, PROMPTS, max_new_tokens=6, decode_kernel="pallas")
  np.testing.assert_array_equal(got, want)
  assert list(stream(model, params, PROMPTS[2], max_new_tokens=6, decode_kernel="pallas")) == (
      want[2, len(PROMPTS[2]):len(PROMPTS[2]) + 6].tolist())


# A prompt of FLASH_ATTENTION_MIN_TOKENS through generate: the layer's prefill test covers the
# equality by default.
@pytest.mark.slow
def test_long_prompts_prefill_with_flash_attention_and_keep_greedy_tokens():
  """Prompts of FLASH_ATTENTION_MIN_TOKENS and more prefill through flash attention (the short
  ones above through the naive path): the greedy tokens equal teacher forcing with the naive
  path all along, for two ragged rows."""
  from mla_jax.layers.masking import FLASH_ATTENTION_MIN_TOKENS, prefill_attn_impl

  cfg = variant(CFG, max_seq_len=FLASH_ATTENTION_MIN_TOKENS + 32, flash_block_q=64,
                flash_block_k=32)
  model = mla_jax.Transformer(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  params = jax.tree_util.tree_map(lambda p: p * 4 if p.ndim >= 2 else p, params)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, cfg.vocab_size, n).tolist()
             for n in (FLASH_ATTENTION_MIN_TOKENS + 10, FLASH_ATTENTION_MIN_TOKENS - 50)]
  assert prefill_attn_impl(FLASH_ATTENTION_MIN_TOKENS) == "flash_attention"
  out, lengths = generate(model, params, prompts, max_new_tokens=6, return_lengths=True)
  for b, prompt in enumerate(prompts):
    row = out[b, :lengths[b]]
    logits, _ = model.apply({"params": params}, jnp.asarray(row[None]), attn_impl="naive")
    predicted = np.asarray(jnp.argmax(logits[0], axis=-1))
    np.testing.assert_array_equal(row[len(prompt):], predicted[len(prompt) - 1:-1])


def _padded(side, pad=59):
  """PROMPTS as one [3,7] array padded on `side` with a real token id, and its attention mask."""
  array, mask = np.full((3, 7), pad, np.int32), np.zeros((3, 7), np.int32)
  for b, prompt in enumerate(PROMPTS):
    where = slice(7 - len(prompt), 7) if side == "left" else slice(0, len(prompt))
    array[b, where], mask[b, where] = prompt, 1
  return array, mask


def test_padded_arrays_continue_the_real_tokens_only(model_and_params):
  """Hugging Face's padding_side="left" habit: with the mask, the pads are not prompt tokens, and
  each row continues exactly as its prompt alone does (teacher-forced above)."""
  model, params = model_and_params
  expected, expected_lengths = generate(model, params, PROMPTS, max_new_tokens=12,
                                        return_lengths=True)
  for side in ("left", "right"):
    array, mask = _padded(side)
    out, lengths = generate(model, params, array, attention_mask=mask, max_new_tokens=12,
                            return_lengths=True)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(lengths, expected_lengths)
  array, _ = _padded("right")
  by_lengths = generate(model, params, jnp.asarray(array), lengths=np.array([7, 1, 4]),
                        max_new_tokens=12)
  np.testing.assert_array_equal(by_lengths, expected)
  # What the pads would have produced had they been read as prompt tokens: a different answer.
  left, _ = _padded("left")
  assert not np.array_equal(generate(model, params, left, lengths=[7, 7, 7], max_new_tokens=12)
                            [1, 7:], expected[1, 1:13])


@pytest.mark.parametrize("prompts, kwargs, message", [
    (np.ones((2, 3), np.int32), {}, r"prompts is an array of shape \(2, 3\) and neither of "
     r"attention_mask and lengths was given: an array cannot say which of its tokens are padding"),
    (np.ones((2, 3), np.int32), dict(attention_mask=np.ones((2, 3)), lengths=[3, 3]),
     "and both of attention_mask and lengths"),
    (np.ones((2, 3), np.int32), dict(attention_mask=[[1, 0, 1], [1, 1, 1]]),
     r"attention_mask row 0 has padding between real tokens \(ones at \[0, 2\]\)"),
    (np.ones((2, 3), np.int32), dict(attention_mask=[[0, 0, 0], [1, 1, 1]]),
     "attention_mask row 0 is all 0"),
    (np.ones((2, 3), np.int32), dict(attention_mask=np.ones((2, 4))),
     r"attention_mask must have the prompts' shape \(2, 3\), got \(2, 4\)"),
    (np.ones((2, 3), np.int32), dict(attention_mask=[[1, 2, 1], [1, 1, 1]]),
     "attention_mask must hold only 0"),
    (np.ones((2, 3), np.int32), dict(lengths=[3, 4]), r"lengths must be in \[1, T=3\]"),
    (np.ones((2, 3), np.int32), dict(lengths=[3]), r"lengths must be an integer array \[B=2\]"),
    ([[1, 2]], dict(lengths=[2]), "attention_mask and lengths go with a prompts array"),
])
def test_ambiguous_prompt_arrays_are_refused(model_and_params, prompts, kwargs, message):
  model, params = model_and_params
  with pytest.raises(ValueError, match=message):
    generate(model, params, prompts, max_new_tokens=3, **kwargs)


def test_decode_step_traces_once_per_generation(model_and_params, monkeypatch):
  model, params = model_and_params
  sampling._prefill.clear_cache()
  sampling._decode_loop.clear_cache()
  traced = chex.assert_max_traces(sampling.decode_token, n=1)  # a second trace raises
  monkeypatch.setattr(sampling, "decode_token", traced)
  # Counted as growth: earlier tests' programs may outlive clear_cache in JAX's caches.
  programs = lambda: (sampling._prefill._cache_size(), sampling._decode_loop._cache_size())
  before = programs()
  generate(model, params, PROMPTS, max_new_tokens=20)
  first = programs()
  generate(model, params, [[1, 2, 3, 4, 5, 6, 7], [9], [4, 4]], max_new_tokens=20)  # same shapes
  assert programs() == first  # 20 tokens, one compiled loop, reused
  assert first[0] - before[0] <= 1 and first[1] - before[1] <= 1
  with pytest.raises(AssertionError):  # the counter is live: a new shape traces the step again
    generate(model, params, [[1, 2]], max_new_tokens=20)


def test_samplers(model_and_params):
  model, params = model_and_params
  greedy = generate(model, params, PROMPTS, max_new_tokens=10)
  top1 = generate(model, params, PROMPTS, max_new_tokens=10, temperature=1.5, top_k=1, seed=3)
  np.testing.assert_array_equal(top1, greedy)
  tiny_p = generate(model, params, PROMPTS, max_new_tokens=10, temperature=1.5, top_p=1e-6,
                    seed=4)
  np.testing.assert_array_equal(tiny_p, greedy)
  a = generate(model, params, PROMPTS, max_new_tokens=10, temperature=1.0, seed=7)
  b = generate(model, params, PROMPTS, max_new_tokens=10, temperature=1.0, seed=7)
  c = generate(model, params, PROMPTS, max_new_tokens=10, temperature=1.0, seed=8)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_stream_yields_what_generate_returns(model_and_params):
  model, params = model_and_params
  expected = generate(model, params, [PROMPTS[0]], max_new_tokens=15, temperature=0.9, seed=11)
  streamed = list(stream(model, params, PROMPTS[0], max_new_tokens=15, temperature=0.9, seed=11))
  assert streamed == expected[0, len(PROMPTS[0]):].tolist()


def test_eos_ends_a_row_and_pads_after_it(model_and_params):
  model, params = model_and_params
  greedy = generate(model, params, [PROMPTS[1]], max_new_tokens=10)[0]
  eos = int(greedy[3])  # make the third new token the EOS
  out, lengths = generate(model, params, [PROMPTS[1]], max_new_tokens=10, eos_id=eos, pad_id=60,
                          return_lengths=True)
  first = list(greedy[1:]).index(eos) + 1  # where that token first appears among new tokens
  assert lengths[0] == 1 + first
  np.testing.assert_array_equal(out[0, :lengths[0]], greedy[:lengths[0]])
  assert (out[0, lengths[0]:] == 60).all()


def test_temperature_sampling_matches_softmax_frequencies():
  """20,000 draws from fixed logits: chi-square against softmax(logits / T) with 4 degrees of
  freedom must stay below 18.47, its 0.1% critical value (a correct sampler fails 1 in 1000)."""
  logits = jnp.array([2.0, 1.0, 0.0, -0.5, 1.5])
  draws = 20_000
  for temperature in (0.5, 1.0, 2.0):
    tokens = Sampler(temperature)(jnp.broadcast_to(logits, (draws, 5)), jax.random.key(0))
    observed = np.bincount(np.asarray(tokens), minlength=5)
    expected = np.asarray(jax.nn.softmax(logits / temperature)) * draws
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 18.47, (temperature, observed, expected)
  # top_k=2 keeps the two likeliest; top_p=0.6 keeps the smallest prefix with mass >= 0.6.
  top2 = np.asarray(Sampler(1.0, top_k=2)(jnp.broadcast_to(logits, (2000, 5)), jax.random.key(1)))
  assert set(np.unique(top2)) == {0, 4}
  probs = np.asarray(jax.nn.softmax(logits))  # sorted: 0 (.41), 4 (.25), 1 (.15), ...
  top_p = np.asarray(Sampler(1.0, top_p=0.6)(jnp.broadcast_to(logits, (2000, 5)),
                                               jax.random.key(2)))
  assert probs[0] + probs[4] >= 0.6 and set(np.unique(top_p)) == {0, 4}


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[]), "prompts is empty"),
    (dict(prompts=[[1] * 60]), r"longest prompt \(60 tokens\) \+ max_new_tokens \(5\) = 65 exceeds"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(max_new_tokens=-2), "max_new_tokens=-2"),
    (dict(top_p=0.0), r"top_p=0.0 is invalid: must be in \(0, 1\]"),
    (dict(top_p=1.2), r"top_p=1.2 is invalid"),
    (dict(temperature=-0.1), "temperature=-0.1"),
    (dict(top_k=0), r"top_k=0 is invalid: must be in \[1, vocab_size=61\]"),
    (dict(prompts=[[1, 61]]), r"prompt 0 has token ids outside \[0, vocab_size=61\)"),
    # Non-finite floats pass every `<` comparison: NaN sampled garbage, inf sampled uniformly.
    (dict(temperature=float("nan")), r"^temperature=nan is invalid: must be a finite number >= 0 "
                                     r"\(0 = greedy"),
    (dict(temperature=float("inf")), r"^temperature=inf is invalid: must be a finite number >= 0"),
    (dict(temperature=True), r"^temperature=True is invalid"),
    (dict(top_p=float("nan")), r"^top_p=nan is invalid: must be in \(0, 1\] \(a finite number\)"),
    (dict(top_k=2.0), r"^top_k=2.0 is invalid: must be in \[1, vocab_size=61\] \(an integer\)"),
    (dict(eos_id=1.5), r"^eos_id=1.5 is invalid: must be an integer token id in \[0, "
                       r"vocab_size=61\)$"),
    (dict(pad_id=-1), r"^pad_id=-1 is invalid: must be an integer token id in \[0, "
                      r"vocab_size=61\)$"),
    (dict(pad_id=61), r"^pad_id=61 is invalid: must be an integer token id in \[0, "),
    (dict(seed=1.5), r"^seed=1.5 is invalid: must be an integer"),
    (dict(seed="3"), r"^seed='3' is invalid: must be an integer"),
    (dict(seed=True), r"^seed=True is invalid: must be an integer"),
    (dict(decode_kernel="triton"), r"^model.decode_kernel='triton' is invalid: allowed: auto, "
                                   r"xla, pallas"),
    (dict(prompts=[1, 2, 3]), r"^prompts must be a list of token-id lists, one per prompt: "
                              r"\[\[5, 9, 2\]\] for one prompt.*; got a flat list of 3 ints: for "
                              r"one prompt wrap it, generate\(model, params, \[prompt\], \.\.\.\)$"),
    (dict(prompts="hello"), r"^prompts must be a list of token-id lists.* got str$"),
    (dict(prompts=[[1, 2], 3]), r"^prompt 1 must be a sequence of token ids, got int 3: prompts "
                                r"must be a list of token-id lists"),
    (dict(prompts=[[1, [2]]]), r"^prompt 0 must hold integer token ids, got \[2\] \(list\) at "
                               r"position 1: "),
])
def test_bad_requests_are_refused_before_compute(model_and_params, kwargs, message):
  model, params = model_and_params
  request = dict(prompts=[[1, 2]], max_new_tokens=5)
  request.update(kwargs)
  with pytest.raises(ValueError, match=message):
    generate(model, params, request.pop("prompts"), **request)


@pytest.mark.parametrize("prompt, kwargs, message", [
    ([[1, 2]], {}, r"^prompt 0 must hold integer token ids, got \[1, 2\] \(list\) at position 0: "
                   r"stream takes one prompt, a flat list of token ids such as \[5, 9, 2\]; for "
                   r"several prompts use generate$"),
    ([1, 2], dict(temperature=float("nan")), r"^temperature=nan is invalid"),
    ([1, 2], dict(seed=0.5), r"^seed=0.5 is invalid: must be an integer"),
])
def test_stream_refuses_bad_requests_before_compute(model_and_params, prompt, kwargs, message):
  model, params = model_and_params
  with pytest.raises(ValueError, match=message):
    stream(model, params, prompt, max_new_tokens=3, **kwargs)


def test_numpy_scalars_and_iterables_stay_accepted(model_and_params):
  """The stricter checks still take NumPy numbers and any iterable of ids."""
  model, params = model_and_params
  out = generate(model, params, (range(1, 4) for _ in range(1)), max_new_tokens=2,
                 temperature=np.float32(0.5), seed=np.int64(3), pad_id=np.int32(0))
  assert out.shape == (1, 5) and out[0, :3].tolist() == [1, 2, 3]


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  from mla_jax.train import train

  workdir = tmp_path_factory.mktemp("gen")
  config = load_config(None, f"workdir={workdir}", "train.steps=20", "train.warmup_steps=2",
                       "train.batch_size=8", "train.seq_len=64", "train.eval_every=20",
                       "train.checkpoint_every=20", "data.path=" + str(
                           __import__("pathlib").Path(sampling.__file__).parent))
  train(config, log=lambda _: None, progress=False)
  return workdir


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "mla_jax.cli", "generate", *args],
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # trains a workdir first; stream() is tested in-process by default
def test_cli_streams_one_prompt_and_reports_tokens_per_second(trained_workdir):
  result = _cli("--checkpoint", str(trained_workdir), "--prompt", "def ", "--max-new-tokens", "30",
                "--temperature", "0")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("def ")
  assert "prefill: 4 tokens" in result.stderr and "decode: 29 tokens" in result.stderr
  assert "tokens/s" in result.stderr


def test_cli_generates_a_prompt_file_as_one_batch(trained_workdir, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("import \n\nclass A:\n")
  result = _cli("--checkpoint", str(trained_workdir), "--prompt-file", str(prompts),
                "--max-new-tokens", "10", "--seed", "1")
  assert result.returncode == 0, result.stderr
  rows = result.stdout.split("---\n")
  assert rows[0].startswith("import ") and rows[1].startswith("class A:")
  assert "2 prompts (15 tokens)" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens=0"),
    (["--prompt", "x", "--top-p", "0"], "top_p=0.0"),
    (["--prompt", "x", "--temperature", "-1"], "temperature=-1.0"),
    (["--prompt", "x" * 250, "--max-new-tokens", "10"], r"exceeds model.max_seq_len \(256\)"),
])
def test_cli_bad_requests(trained_workdir, args, message):
  result = _cli("--checkpoint", str(trained_workdir), *args)
  assert result.returncode == 2
  assert __import__("re").search(message, result.stderr), result.stderr
  assert result.stdout == ""


def test_cli_missing_or_incompatible_checkpoint(trained_workdir, tmp_path):
  result = _cli("--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x")
  assert result.returncode == 2 and "is not a training workdir" in result.stderr
  import shutil

  broken = tmp_path / "broken"
  shutil.copytree(trained_workdir, broken)
  config = (broken / "config.yaml").read_text().replace("kv_lora_rank: 32", "kv_lora_rank: 16")
  (broken / "config.yaml").write_text(config)
  result = _cli("--checkpoint", str(broken), "--prompt", "x")
  assert result.returncode == 2 and "model.kv_lora_rank: 32 -> 16" in result.stderr
