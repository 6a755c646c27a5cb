"""Flash-decoding: the blocked online-softmax loop equals the reference absorbed einsum path, stays
NaN-safe, splits over a sequence-sharded cache, and its compiled step reads the cache once."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import mla_jax
from mla_jax.cache import load_float, store_float
from mla_jax.layers.flash_decode import (grouped_decode_partials, merge_splits,
                                         mla_decode_attention, mla_decode_partials, normalize)
from mla_jax.sharding import make_mesh, shard, sharded_cached_apply
from tests.helpers import TINY_CONFIGS, rel_err, variant

TOL = 1e-5  # float32, relative to the logits' scale


def _reference_latent_attention(q_lat, q_rope, c_kv, k_rope, kv_lengths, positions, scale):
  """softmax over the visible slots in float64 NumPy, written directly from the definition."""
  q_lat, q_rope, c_kv, k_rope = (np.asarray(a, np.float64) for a in (q_lat, q_rope, c_kv, k_rope))
  b, t, h, c = q_lat.shape
  out = np.zeros((b, t, h, c))
  for i in range(b):
    for j in range(t):
      seen = min(int(kv_lengths[i]), int(positions[i, j]) + 1)
      if seen <= 0:
        continue
      scores = (np.einsum("hc,sc->hs", q_lat[i, j], c_kv[i, :seen])
                + np.einsum("hr,sr->hs", q_rope[i, j], k_rope[i, :seen])) * scale
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      out[i, j] = (probs / probs.sum(-1, keepdims=True)) @ c_kv[i, :seen]
  return out


@pytest.mark.parametrize("block_size", [1, 4, 5, 16, 64])  # divides S=16 or not, S, > S
def test_latent_attention_matches_the_definition_with_nan_in_empty_slots(block_size):
  b, t, h, c, r, s = 4, 3, 2, 8, 4, 16
  keys = jax.random.split(jax.random.key(0), 4)
  q_lat = jax.random.normal(keys[0], (b, t, h, c))
  q_rope = jax.random.normal(keys[1], (b, t, h, r))
  c_kv = jax.random.normal(keys[2], (b, s, c))
  k_rope = jax.random.normal(keys[3], (b, s, r))
  kv_lengths = jnp.array([16, 0, 7, 10], jnp.int32)  # full, empty, mid-block, block-aligned
  positions = jnp.array([[13, 14, 15], [0, 1, 2], [4, 5, 6], [9, 3, 11]], jnp.int32)
  holds = jnp.arange(s)[None, :, None] < kv_lengths[:, None, None]
  c_nan, k_nan = jnp.where(holds, c_kv, jnp.nan), jnp.where(holds, k_rope, jnp.nan)
  got = mla_decode_attention(q_lat, q_rope, c_nan, k_nan, kv_lengths, positions, scale=0.3,
                             block_size=block_size)
  assert got.dtype == jnp.float32 and np.isfinite(np.asarray(got)).all()
  want = _reference_latent_attention(q_lat, q_rope, c_kv, k_rope, kv_lengths, positions, 0.3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert not np.asarray(got[1]).any()  # a sequence with no token attends to nothing: zeros


def test_partials_of_disjoint_slots_merge_into_the_whole():
  """merge_splits over three parts of S (one of them empty for a row) gives the partials of
  the whole, so a split-KV kernel's parts combine exactly."""
  b, t, h, c, r, s = 2, 2, 3, 8, 4, 12
  keys = jax.random.split(jax.random.key(1), 4)
  q_lat, q_rope = jax.random.normal(keys[0], (b, t, h, c)), jax.random.normal(keys[1], (b, t, h, r))
  c_kv, k_rope = jax.random.normal(keys[2], (b, s, c)), jax.random.normal(keys[3], (b, s, r))
  lengths = jnp.array([12, 5], jnp.int32)
  positions = jnp.array([[10, 11], [3, 4]], jnp.int32)
  whole = mla_decode_partials(q_lat, q_rope, c_kv, k_rope, lengths, positions, scale=0.4)
  parts = [mla_decode_partials(q_lat, q_rope, c_kv[:, lo:hi], k_rope[:, lo:hi],
                               jnp.clip(lengths - lo, 0, hi - lo), positions - lo, scale=0.4)
           for lo, hi in ((0, 4), (4, 8), (8, 12))]  # row 1 holds nothing in the last part
  m, l, acc = (jnp.stack([p[i] for p in parts], axis=1) for i in range(3))
  merged = merge_splits(m, l, acc, axis=1)
  for got, want in zip(merged, whole):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_size", [3, 11])  # does not divide S=11, spans S
def test_grouped_attention_over_the_head_major_cache_matches_softmax(block_size):
  """k [B,G,S,K], v [B,G,S,V] walked along axis 2; NaN in the empty slots cannot leak, a row
  with no token gives zeros."""
  b, t, g, j, k, v, s = 3, 1, 2, 3, 8, 5, 11
  keys = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(keys[0], (b, t, g, j, k))
  kc, vc = jax.random.normal(keys[1], (b, g, s, k)), jax.random.normal(keys[2], (b, g, s, v))
  lengths = [11, 4, 0]
  kv_lengths, positions = jnp.array(lengths), jnp.array([[10], [3], [0]])
  holds = jnp.arange(s)[None, None, :, None] < kv_lengths[:, None, None, None]  # [B,1,S,1]
  got = normalize(*grouped_decode_partials(q, jnp.where(holds, kc, jnp.nan),
                                           jnp.where(holds, vc, jnp.nan), kv_lengths, positions,
                                           scale=0.5, block_size=block_size)[1:])
  assert np.isfinite(np.asarray(got)).all() and not np.asarray(got[2]).any()
  for i, n in enumerate(lengths[:2]):
    scores = jnp.einsum("GJK,GSK->GJS", q[i, 0], kc[i, :, :n]) * 0.5
    want = jnp.einsum("GJS,GSV->GJV", jax.nn.softmax(scores, -1), vc[i, :, :n])
    np.testing.assert_allclose(got[i, 0], want, rtol=1e-5, atol=1e-6)


def test_bad_block_size_is_refused():
  x = jnp.zeros((1, 1, 1, 4))
  with pytest.raises(ValueError, match="block_size=0"):
    mla_decode_attention(x, x, jnp.zeros((1, 4, 4)), jnp.zeros((1, 4, 4)), jnp.ones(1, jnp.int32),
                         jnp.zeros((1, 1), jnp.int32), scale=1.0, block_size=0)
  with pytest.raises(ValueError, match="model.decode_block_size=0"):
    variant(TINY_CONFIGS["q_lora"], decode_block_size=0)


def test_bfloat16_bits_round_trip_exactly():
  x = jnp.array([0.0, -0.0, 1.5, -3.25e-3, 6.5e4, jnp.inf, 1e-40], jnp.float32)
  stored = store_float(x, jnp.uint16)
  assert stored.dtype == jnp.uint16
  np.testing.assert_array_equal(load_float(stored), x.astype(jnp.bfloat16).astype(jnp.float32))


def _setup(cfg, batch, length, seed=0):
  model = mla_jax.Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(seed), (batch, length), 0, cfg.vocab_size)
  params = model.init(jax.random.key(seed + 1), tokens[:, :1])["params"]
  return model, params, tokens


@functools.lru_cache(maxsize=None)
def _jitted(model):
  """model.apply under jit (one compile per shape, instead of op-by-op dispatch)."""
  return jax.jit(lambda params, tokens, cache=None, num_tokens=None, attn_impl="auto":
                 model.apply({"params": params}, tokens, cache=cache, num_tokens=num_tokens,
                             attn_impl=attn_impl), static_argnames="attn_impl")


def _poisoned_ragged_cache(model, params, tokens, prompt_lengths, max_len):
  """A cache holding each row's first prompt_lengths[b] tokens, NaN in every other slot."""
  cfg = model.config
  cache = mla_jax.init_cache(cfg, tokens.shape[0], max_len)
  cache = jax.tree_util.tree_map(
      lambda x: jnp.full_like(x, jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x, cache)
  _, cache = _jitted(model)(params, tokens, cache, jnp.asarray(prompt_lengths, jnp.int32),
                           attn_impl="naive")
  return cache


@pytest.mark.parametrize("name, block_size", [  # block divides max_len 40, does not
    ("q_lora", 8), ("q_lora_yarn_5_heads", 3)])
def test_flash_decode_step_equals_the_absorbed_reference(name, block_size):
  cfg = variant(TINY_CONFIGS[name], decode_block_size=block_size)
  model, params, tokens = _setup(cfg, batch=4, length=9)
  # Ragged: full prompt, one ending mid-block, an empty sequence, one token.
  cache = _poisoned_ragged_cache(model, params, tokens, [9, 6, 0, 1], max_len=40)
  apply = _jitted(model)
  # One token for three rows; the empty row gets none and must stay empty (and finite). Then
  # T = 3 (chunked prefill into the non-empty cache), where 'auto' picks flash too.
  for step, num_tokens in ((tokens[:, :1], [1, 1, 0, 1]), (tokens[:, :3], [3, 3, 3, 3])):
    num_tokens = jnp.array(num_tokens, jnp.int32)
    flash, flash_cache = apply(params, step, cache, num_tokens)
    ref, ref_cache = apply(params, step, cache, num_tokens, attn_impl="absorbed")
    assert np.isfinite(np.asarray(flash)).all()
    assert rel_err(flash, ref) <= TOL
    jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6),
                           flash_cache, ref_cache)


@pytest.mark.parametrize("attention, kv_heads", [
    ("gqa", 2), pytest.param("mha", None, marks=pytest.mark.slow),
    pytest.param("mqa", None, marks=pytest.mark.slow)])  # one code path: G = H, 1 < G < H, 1
def test_baselines_flash_decode_equals_their_reference(attention, kv_heads):
  cfg = variant(TINY_CONFIGS["q_lora"], attention=attention, num_kv_heads=kv_heads,
                decode_block_size=3)
  model, params, tokens = _setup(cfg, batch=3, length=7)
  cache = _poisoned_ragged_cache(model, params, tokens, [7, 0, 4], max_len=16)
  flash, _ = _jitted(model)(params, tokens[:, :1], cache, attn_impl="flash")
  ref, _ = _jitted(model)(params, tokens[:, :1], cache, attn_impl="naive")
  assert rel_err(flash, ref) <= TOL


@pytest.mark.slow
def test_flash_without_a_cache_is_causal_attention():
  cfg = TINY_CONFIGS["q_lora_yarn_5_heads"]
  model, params, tokens = _setup(cfg, batch=2, length=10)
  flash, _ = _jitted(model)(params, tokens, attn_impl="flash")
  naive, _ = _jitted(model)(params, tokens, attn_impl="naive")
  assert rel_err(flash, naive) <= TOL


def _sharded_step(cfg, reference_impl):
  """A 12-token step into a NaN-poisoned ragged cache (rows hold 11 and 5 tokens, 32 slots) on
  data=2 x sequence=4: (model, params, tokens, mesh, cache, reference (logits, cache) on one
  device with `reference_impl`, sharded_cached_apply's (logits, cache))."""
  model, params, tokens = _setup(cfg, batch=2, length=12)
  mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 1, "sequence": 4})
  lengths = [11, 5]  # row 1 lives in the first shard only; row 0 spans three shards
  cache = _poisoned_ragged_cache(model, params, tokens[:, :11], lengths, max_len=32)
  reference = _jitted(model)(params, tokens[:, 11:], cache, attn_impl=reference_impl)
  apply = sharded_cached_apply(model, mesh, shard(params, mesh), shard(cache, mesh))
  sharded = apply(shard(params, mesh), tokens[:, 11:], shard(cache, mesh))
  return model, params, tokens, mesh, cache, reference, sharded


def test_sequence_sharded_cache_is_walked_per_shard_and_combined_exactly():
  """data=2 x sequence=4 on 8 fake devices: each device runs the loop over its quarter of S and
  the partial (max, sum, out) triples merge; logits equal the single-device reference path."""
  cfg = variant(TINY_CONFIGS["q_lora_yarn_5_heads"], decode_block_size=3)
  model, params, tokens, mesh, cache, (ref, _), (got, new_cache) = _sharded_step(cfg, "absorbed")
  assert rel_err(got, ref) <= TOL
  assert new_cache.layers[0].c_kv.sharding == NamedSharding(mesh, P("data", "sequence", None))
  # The sharded program merges the partials across the sequence axis (all-reduce) instead of
  # gathering the cache: the only all-gathers move the new token's entries (for the write).
  with jax.set_mesh(mesh):
    text = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c)).lower(
        shard(params, mesh), tokens[:, 11:], shard(cache, mesh)).compile().as_text()
  assert "all-reduce(" in text
  gathered = [np.prod([int(d) for d in re.search(r"\[([\d,]+)\]", line).group(1).split(",")])
              for line in text.splitlines() if "all-gather(" in line]
  assert max(gathered, default=0) < (32 // 4) * cfg.kv_lora_rank  # less than one shard's row


def test_baseline_sequence_sharded_cache_is_walked_per_shard_and_combined_exactly():
  """GQA's head-major K/V [B,G,S,K] split over data=2 x sequence=4 along its axis 2: each device
  walks its quarter of S; logits equal the single-device reference; NaN in empty slots."""
  cfg = variant(TINY_CONFIGS["q_lora"], attention="gqa", num_kv_heads=2, decode_block_size=3)
  _, _, _, mesh, _, (ref, ref_cache), (got, new_cache) = _sharded_step(cfg, "naive")
  assert np.isfinite(np.asarray(got)).all() and rel_err(got, ref) <= TOL
  assert new_cache.layers[0].k.sharding == NamedSharding(mesh, P("data", None, "sequence", None))
  holds = np.arange(32) < np.array([12, 6])[:, None]  # [B,S]: the written token included
  for layer, want in zip(new_cache.layers, ref_cache.layers):
    for x, y in ((layer.k, want.k), (layer.v, want.v)):  # [B,G,S,K]
      np.testing.assert_allclose(np.asarray(x).transpose(0, 2, 1, 3)[holds],
                                 np.asarray(y).transpose(0, 2, 1, 3)[holds], rtol=1e-6, atol=1e-6)


# --- The compiled decode step: bytes, copies, in-place write ------------------------------------

# DeepSeek-V2-Lite's attention shapes (C=512, R=64, 16 heads of 128+64 / 128) in a small model.
LITE = mla_jax.ModelConfig(vocab_size=256, hidden_size=256, num_layers=1, num_heads=16,
                           q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                           qk_rope_head_dim=64, v_head_dim=128, intermediate_size=256,
                           max_seq_len=8192)


def _compiled_step(cfg, batch, max_len, attn_impl, absorbed=True):
  """The jitted decode step (cache donated), with the absorbed weights as generate passes them."""
  model = mla_jax.Transformer(cfg)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  cache = jax.eval_shape(lambda: mla_jax.init_cache(cfg, batch, max_len))
  variables = dict(params)
  if absorbed:
    variables["absorbed"] = jax.eval_shape(
        functools.partial(mla_jax.absorbed_weights, cfg), params["params"])
  step = jax.jit(lambda v, t, c: model.apply(v, t, cache=c, attn_impl=attn_impl),
                 donate_argnums=2)
  compiled = step.lower(variables, jax.ShapeDtypeStruct((batch, 1), jnp.int32), cache).compile()
  weights = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
  latent = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache.layers))
  return compiled, weights, latent


def _bytes_accessed(compiled) -> float:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["bytes accessed"]


def test_decode_step_bytes_follow_the_tokens_held_at_8k():
  """Bytes accessed by the compiled step, from XLA's own cost analysis (HloCostAnalysis).

  XLA counts a while loop's body once, whatever its trip count; so the step is compiled with one
  block spanning the tokens held (decode_block_size = held: the loop runs once) and then XLA's
  count is the whole step's. Same code and per-slot work as the default blocks.

  What it shows: the weights are read once (no transposed copy of kv_b_proj: the absorbed
  weights are passed in); each held latent byte is counted at most 4.2 times, the same number of
  times at 2,048 as at 8,192 held tokens, so the step's bytes follow the tokens held, not the
  8,192 slots; the reference einsum path pays for every slot. The four passes XLA counts for a
  cached byte: the read into a NaN-safe block, the block's write, and the reads of the two dots
  (scores, weighted sum). Only the first reaches memory: a block is a few hundred KB and stays in
  the core's caches (README "Decode at the roofline"), but XLA's count does not know that.
  """
  s = LITE.max_seq_len
  reference, weights, latent = _compiled_step(LITE, 1, s, "absorbed")
  counted = {}
  for held in (s, 2048):
    step, _, _ = _compiled_step(variant(LITE, decode_block_size=held), 1, s, "flash")
    counted[held] = (_bytes_accessed(step) - weights) / (latent * held / s)  # per held byte
  assert 3.8 <= counted[s] <= 4.2, counted  # no whole-cache copy, no weight copy
  assert abs(counted[2048] - counted[s]) <= 0.05 * counted[s], counted  # follows tokens held
  assert _bytes_accessed(reference) - weights > 3 * latent  # the reference: all slots, several x


@pytest.mark.parametrize("attention, kv_heads, cache_dtype", [
    ("mha", None, None), ("gqa", 4, "bfloat16")])
def test_baseline_decode_step_reads_head_major_blocks_as_they_lie(attention, kv_heads,
                                                                  cache_dtype):
  """The baselines' compiled flash step: the donated K/V cache comes back in place, the
  temporaries are one masked K/V block in float32, and no block is transposed or copied for the
  dots. (Over the token-major [B,S,G,K] cache, XLA:CPU transposed and copied every block.)"""
  s = 2048
  cfg = variant(LITE, attention=attention, num_kv_heads=kv_heads, cache_dtype=cache_dtype,
                max_seq_len=s)
  compiled, _, kv_bytes = _compiled_step(cfg, 1, s, "flash", absorbed=False)
  memory = compiled.memory_analysis()
  block = cfg.kv_heads * cfg.decode_block_size * (cfg.qk_head_dim + cfg.v_head_dim) * 4
  assert memory.alias_size_in_bytes >= kv_bytes
  assert memory.temp_size_in_bytes < 1.5 * block
  moved = [int(np.prod([int(d) for d in dims.split(",") if d]))
           for dims in re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} (?:copy|transpose)\(",
                                  compiled.as_text())]
  assert max(moved) < cfg.decode_block_size * cfg.v_head_dim, moved  # no per-head block copied


def _float_block_bytes(cfg, batch) -> int:
  """One block of the cache (latent + RoPE key) in float32: [B, block, C+R]."""
  return batch * cfg.decode_block_size * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


def test_decode_step_has_no_weight_or_cache_sized_temporary():
  """With the default block size: the donated cache comes back in place (aliased) and the
  step's temporaries are about one block; with the absorbed weights passed in there is no transposed
  copy of kv_b_proj either (without them the step makes one per call)."""
  s = LITE.max_seq_len
  kv_b_proj = LITE.kv_lora_rank * LITE.num_heads * (LITE.qk_nope_head_dim + LITE.v_head_dim) * 4
  step, _, latent = _compiled_step(LITE, 1, s, "flash")
  memory = step.memory_analysis()
  assert memory.alias_size_in_bytes >= latent
  assert memory.temp_size_in_bytes < 1.5 * _float_block_bytes(LITE, 1) < 0.3 * kv_b_proj
  derived, _, _ = _compiled_step(LITE, 1, s, "flash", absorbed=False)
  assert derived.memory_analysis().temp_size_in_bytes > 0.9 * kv_b_proj  # W_UK, W_UV copied


@pytest.mark.parametrize("cache_dtype", ["bfloat16"])  # float32: in the bytes test above
def test_decode_step_writes_in_place_and_copies_no_cache(cache_dtype):
  """The donated cache comes back in the same buffer (aliased), and the step's temporaries are
  about one widened block, not a cache: no zeroed, widened or gathered whole-cache copy."""
  s = 4096
  cfg = variant(LITE, cache_dtype=cache_dtype, max_seq_len=s)
  compiled, _, latent = _compiled_step(cfg, 2, s, "flash")
  memory = compiled.memory_analysis()
  assert memory.alias_size_in_bytes >= latent
  assert memory.temp_size_in_bytes < 1.5 * _float_block_bytes(cfg, 2)  # a block, widened
  # No array of the cache's shape in float32 anywhere in the program (a widened copy).
  assert f"f32[2,{s},512]" not in compiled.as_text() or cache_dtype == "float32"
  reference, _, _ = _compiled_step(cfg, 2, s, "absorbed")
  assert reference.memory_analysis().temp_size_in_bytes > 0.5 * latent  # what flash replaced
