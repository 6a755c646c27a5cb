"""int8/int4 latent caches: layout and exact bytes, decode through them (dequantized block by
block) against the reference path and the float cache, and what the compiled step reads."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mla_jax
from mla_jax.kinds import cache_bytes_per_token
from mla_jax.sharding import make_mesh, tree_shardings
from tests.helpers import TINY_CONFIGS, rel_err, variant

PRESETS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("kind, width, dtype", [("int8", 32, jnp.int8), ("int4", 16, jnp.uint8)])
def test_layout_is_latent_codes_one_scale_per_token_and_bf16_rope(kind, width, dtype):
  cfg = variant(TINY_CONFIGS["q_lora"], cache_dtype=kind)
  layer = mla_jax.init_cache(cfg, 2, 8).layers[0]
  assert layer.c_kv.shape == (2, 8, width) and layer.c_kv.dtype == dtype
  assert layer.c_kv_scale.shape == (2, 8, 1) and layer.c_kv_scale.dtype == jnp.float32
  assert layer.k_rope.dtype == jnp.uint16  # bfloat16 bits
  assert layer.dtype == (jnp.int8 if kind == "int8" else jnp.int4)
  assert cache_bytes_per_token(cfg) == cfg.num_layers * (width * 1 + 4 + 8 * 2)
  mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 1, "sequence": 4})
  shardings = tree_shardings(mla_jax.init_cache(cfg, 2, 8), mesh)
  assert shardings.layers[0].c_kv_scale.spec == jax.sharding.PartitionSpec("data", "sequence",
                                                                             None)


def test_deepseek_v2_int4_cache_is_94_percent_below_deepseek_67b():
  """Whole-model bytes per token from the cache structures: DeepSeek 67B (95 layers, GQA with 8
  KV heads of 128, bfloat16) caches 95 x 2 x 8 x 128 x 2 = 389,120 bytes per token."""
  v2 = mla_jax.load_config(PRESETS / "deepseek_v2.yaml").model
  baseline = 95 * 2 * 8 * 128 * 2
  per_token = {kind: cache_bytes_per_token(variant(v2, cache_dtype=kind))
               for kind in ("bfloat16", "int8", "int4")}
  assert per_token == {"bfloat16": 60 * 576 * 2, "int8": 60 * (512 + 4 + 128),
                       "int4": 60 * (256 + 4 + 128)}
  assert 1 - per_token["int4"] / baseline >= 0.94  # 94.0%
  assert per_token["int8"] / per_token["bfloat16"] <= 0.6


def test_quantized_caches_are_refused_for_baselines_and_odd_widths():
  with pytest.raises(ValueError, match="model.cache_dtype='int8'.*attention=gqa"):
    variant(TINY_CONFIGS["q_lora"], attention="gqa", num_kv_heads=2, cache_dtype="int8")
  with pytest.raises(ValueError, match="even kv_lora_rank"):
    variant(TINY_CONFIGS["q_lora"], kv_lora_rank=31, cache_dtype="int4")
  with pytest.raises(ValueError, match="model.cache_dtype='int3'"):
    variant(TINY_CONFIGS["q_lora"], cache_dtype="int3")


@functools.lru_cache(maxsize=None)
def _apply(model):
  return jax.jit(lambda p, t, c, n=None, attn_impl="auto": model.apply(
      {"params": p}, t, cache=c, num_tokens=n, attn_impl=attn_impl), static_argnames="attn_impl")


@pytest.mark.parametrize("kind, tolerance", [("int8", 2e-2), ("int4", 2e-1)])
def test_decode_through_a_quantized_cache(kind, tolerance):
  """Prefill a ragged batch into the quantized cache (NaN in its unused slots), decode a step:
  the blocked path equals the reference path on the same quantized cache (1e-5: dequantizing
  block by block is exact), and stays within `tolerance` of the bfloat16 cache's logits."""
  base = variant(TINY_CONFIGS["q_lora_yarn_5_heads"], decode_block_size=3)
  tokens = jax.random.randint(jax.random.key(0), (3, 9), 0, base.vocab_size)
  params = mla_jax.Transformer(base).init(jax.random.key(1), tokens[:, :1])["params"]
  lengths = jnp.array([9, 4, 6], jnp.int32)
  logits = {}
  for cache_dtype in ("bfloat16", kind):
    model = mla_jax.Transformer(variant(base, cache_dtype=cache_dtype))
    cache = mla_jax.init_cache(model.config, 3, 24)
    layers = tuple(layer.replace(c_kv_scale=jnp.full_like(layer.c_kv_scale, jnp.nan))
                   if layer.c_kv_scale is not None else layer for layer in cache.layers)
    _, cache = _apply(model)(params, tokens, cache.replace(layers=layers), lengths)
    flash, new = _apply(model)(params, tokens[:, :1], cache)
    logits[cache_dtype] = flash
    if cache_dtype == kind:
      reference, _ = _apply(model)(params, tokens[:, :1], cache, attn_impl="absorbed")
      assert np.isfinite(np.asarray(flash)).all()
      assert rel_err(flash, reference) <= 1e-5
      assert np.isnan(np.asarray(new.layers[0].c_kv_scale[1, 9:])).all()  # never written
  assert rel_err(logits[kind], logits["bfloat16"]) <= tolerance


def _compiled_step(cfg, batch, max_len):
  model = mla_jax.Transformer(cfg)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  cache = jax.eval_shape(lambda: mla_jax.init_cache(cfg, batch, max_len))
  step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c), donate_argnums=2)
  compiled = step.lower(params["params"], jax.ShapeDtypeStruct((batch, 1), jnp.int32),
                        cache).compile()
  weights = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
  return compiled, weights


def test_int8_step_reads_at_most_0_6_of_the_bf16_steps_cache_bytes():
  """From the compiled steps' memory analysis: the cache bytes each step takes in (arguments
  minus weights and tokens, donated and updated in place), and temporaries of a few blocks, never
  a dequantized copy of the cache."""
  lite = mla_jax.ModelConfig(vocab_size=256, hidden_size=128, num_layers=1, num_heads=16,
                             q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                             qk_rope_head_dim=64, v_head_dim=128, intermediate_size=128,
                             max_seq_len=4096)
  read = {}
  for kind in ("bfloat16", "int8"):
    compiled, weights = _compiled_step(variant(lite, cache_dtype=kind), 2, 4096)
    memory = compiled.memory_analysis()
    read[kind] = memory.argument_size_in_bytes - weights - 2 * 4  # tokens [2,1] int32
    assert memory.alias_size_in_bytes >= read[kind] - 8  # in place (lengths aside)
    kv_b_proj = 512 * 16 * 256 * 4  # its two halves are sliced out per step
    assert memory.temp_size_in_bytes < kv_b_proj + 0.1 * 2 * 4096 * 512 * 4
  assert read["int8"] <= 0.6 * read["bfloat16"]


@pytest.mark.slow
def test_trained_model_generates_and_predicts_the_same_through_int8_and_int4_caches(tmp_path,
                                                                                    capsys):
  """The README's main model (configs/tiny.yaml, byte-level, Python stdlib), trained here for
  300 of its 1,000 steps: greedy generations through an int8 cache agree with the bfloat16
  cache's on >= 95% of tokens over a fixed prompt set, and the validation perplexity through an
  int4 cache is within 2% of the bfloat16 cache's (printed with -s)."""
  from mla_jax.tokenizers import ByteTokenizer
  from mla_jax.train.data import batch_at, load_corpus
  from mla_jax.sampling import generate
  from mla_jax.train import train

  config = mla_jax.load_config(PRESETS / "tiny.yaml", f"workdir={tmp_path}", "train.steps=300",
                               "train.eval_every=300", "train.checkpoint_every=300",
                               "train.sample_tokens=0")
  params = train(config, log=lambda _: None, progress=False)["params"]
  models = {kind: mla_jax.Transformer(variant(config.model, cache_dtype=kind))
            for kind in ("bfloat16", "int8", "int4")}

  tokenizer = ByteTokenizer()
  prompts = [tokenizer.encode(p) for p in ("def ", "import os\n", "class Stack:\n    def ",
                                           "for i in range(", "if __name__ == ", "return self.",
                                           "    raise ValueError(", "# Copyright ")]
  tokens = {kind: generate(models[kind], params, prompts, max_new_tokens=48)
            for kind in ("bfloat16", "int8")}
  new = [(tokens["int8"][b, len(p):len(p) + 48], tokens["bfloat16"][b, len(p):len(p) + 48])
         for b, p in enumerate(prompts)]
  agreement = np.mean(np.concatenate([a == b for a, b in new]))
  with capsys.disabled():
    print(f"int8 vs bfloat16 cache, greedy tokens equal: {agreement:.1%}")
  assert agreement >= 0.95

  corpus = load_corpus(config.data, min_tokens=129)
  perplexity = {}
  for kind, model in models.items():
    losses = []
    for i in range(4):
      inputs, targets = batch_at(corpus.val, 0, 1, i, 8, 128)
      cache = mla_jax.init_cache(model.config, 8, 128)
      logits, _ = _apply(model)(params, jnp.asarray(inputs), cache)  # reads go through the cache
      logp = jax.nn.log_softmax(logits, -1)
      losses.append(-np.mean(np.take_along_axis(np.asarray(logp), targets[..., None], -1)))
    perplexity[kind] = float(np.exp(np.mean(losses)))
  with capsys.disabled():
    print("validation perplexity by cache dtype:", perplexity)
  assert perplexity["int4"] <= 1.02 * perplexity["bfloat16"]
  assert perplexity["int8"] <= 1.005 * perplexity["bfloat16"]

  # And from the command line, greedy through an int8 cache prints what generate returns.
  from mla_jax.cli import main
  assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "def ",
               "--max-new-tokens", "48", "--temperature", "0", "--cache-dtype", "int8"]) == 0
  printed = capsys.readouterr().out.rstrip("\n")
  expected = tokenizer.decode(tokens["int8"][0, :4 + 48])
  assert len(printed) > 4 and (expected.startswith(printed) or printed.startswith(expected))
