"""Paged flash-decoding equals the contiguous flash path on the same tokens, and the paged cache
written by the model equals the contiguous one token for token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.cache import LatentCache, init_latent_cache, latent_operand, write_cache
from mla_jax.config import ModelConfig
from mla_jax.kinds import init_cache, init_paged_cache
from mla_jax.layers.flash_decode import (grouped_decode_partials, mla_decode_attention,
                                         normalize)
from mla_jax.layers.paged_attention import (paged_grouped_decode_partials,
                                            paged_mla_decode_partials, pages_per_block)
from mla_jax.model import Transformer
from mla_jax.paged_cache import PagedLayerCache, as_contiguous, page_bytes, write_paged

from tests.helpers import TINY_CONFIGS, variant


def _random_table(batch: int, per_sequence: int, num_pages: int, rng) -> np.ndarray:
  """Shuffled distinct page ids [B, per_sequence] from a pool of num_pages."""
  return rng.permutation(num_pages)[:batch * per_sequence].reshape(batch, per_sequence).astype(
      np.int32)


def _to_pages(contiguous: np.ndarray, table: np.ndarray, num_pages: int,
              seq_axis: int = 1) -> np.ndarray:
  """A contiguous [B,S,...] (or [B,G,S,...]) array laid into a pool [P,(G,)page,...] through
  the page table [B,S/page]; unused pages hold NaN, which must never leak into a result."""
  x = np.moveaxis(contiguous, seq_axis, 1)  # [B,S,...]
  page_size = x.shape[1] // table.shape[1]
  pool = np.full((num_pages, page_size) + x.shape[2:], np.nan, np.float32)
  for row in range(table.shape[0]):
    for j, page in enumerate(table[row]):
      pool[page] = x[row, j * page_size:(j + 1) * page_size]
  return np.moveaxis(pool, 1, seq_axis)


@pytest.mark.parametrize("page_size,block_size", [(4, 16), (8, 8), (4, 6), (16, 64)])
def test_paged_mla_equals_contiguous_flash(page_size, block_size):
  rng = np.random.default_rng(page_size * 100 + block_size)
  b, t, h, c, r, s = 4, 3, 2, 16, 8, 48
  q_lat = jnp.asarray(rng.normal(size=(b, t, h, c)), jnp.float32)
  q_rope = jnp.asarray(rng.normal(size=(b, t, h, r)), jnp.float32)
  c_kv = rng.normal(size=(b, s, c)).astype(np.float32)
  k_rope = rng.normal(size=(b, s, r)).astype(np.float32)
  lengths = jnp.asarray([0, 5, 31, 48], jnp.int32)  # empty, mid-page, mid-block, full
  positions = jnp.maximum(lengths[:, None] - t + jnp.arange(t)[None], 0)
  expected = mla_decode_attention(q_lat, q_rope, jnp.asarray(c_kv), jnp.asarray(k_rope), lengths,
                                  positions, scale=0.3, block_size=block_size)
  num_pages = b * s // page_size + 5
  table = _random_table(b, s // page_size, num_pages, rng)
  pool_c, pool_r = _to_pages(c_kv, table, num_pages), _to_pages(k_rope, table, num_pages)
  got = normalize(*paged_mla_decode_partials(
      q_lat, q_rope, jnp.asarray(pool_c), jnp.asarray(pool_r), jnp.asarray(table), lengths,
      positions, scale=0.3, pages_per_block=pages_per_block(block_size, page_size))[1:])
  assert np.isfinite(np.asarray(got)).all()  # NaN in unused slots never leaks
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
  assert float(jnp.abs(got[0]).max()) == 0.0  # the empty sequence attends to nothing


def test_paged_grouped_equals_contiguous_flash():
  rng = np.random.default_rng(7)
  b, t, g, j, k_dim, v_dim, s, page = 3, 2, 2, 3, 8, 6, 32, 8
  q = jnp.asarray(rng.normal(size=(b, t, g, j, k_dim)), jnp.float32)
  k = rng.normal(size=(b, g, s, k_dim)).astype(np.float32)
  v = rng.normal(size=(b, g, s, v_dim)).astype(np.float32)
  lengths = jnp.asarray([1, 17, 32], jnp.int32)
  positions = lengths[:, None] - t + jnp.arange(t)[None]
  expected = normalize(*grouped_decode_partials(q, jnp.asarray(k), jnp.asarray(v), lengths,
                                                positions, scale=0.5, block_size=16)[1:])
  table = _random_table(b, s // page, 15, rng)
  pool_k, pool_v = _to_pages(k, table, 15, seq_axis=2), _to_pages(v, table, 15, seq_axis=2)
  got = normalize(*paged_grouped_decode_partials(
      q, jnp.asarray(pool_k), jnp.asarray(pool_v), jnp.asarray(table), lengths, positions,
      scale=0.5, pages_per_block=2)[1:])
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_write_paged_puts_tokens_at_their_page_slot_and_drops_padding():
  cfg = TINY_CONFIGS["q_lora"]
  cache = init_paged_cache(cfg, num_pages=6, page_size=4, batch_size=2, pages_per_sequence=3)
  table = jnp.asarray([[5, 2, 6], [0, 6, 6]], jnp.int32)  # 6 = NO_PAGE
  layer = cache.layers[0].replace(page_table=table)
  new = LatentCache(c_kv=jnp.arange(2 * 3 * 32, dtype=jnp.float32).reshape(2, 3, 32) + 1,
                    k_rope=jnp.ones((2, 3, 8)))
  lengths = jnp.asarray([3, 1], jnp.int32)
  out = write_paged(new, layer, lengths, num_tokens=jnp.asarray([3, 2], jnp.int32))
  pool = np.asarray(out.pool.c_kv)
  np.testing.assert_array_equal(pool[5, 3], np.asarray(new.c_kv[0, 0]))  # position 3
  np.testing.assert_array_equal(pool[2, 0], np.asarray(new.c_kv[0, 1]))  # position 4
  np.testing.assert_array_equal(pool[2, 1], np.asarray(new.c_kv[0, 2]))  # position 5
  np.testing.assert_array_equal(pool[0, 1], np.asarray(new.c_kv[1, 0]))
  np.testing.assert_array_equal(pool[0, 2], np.asarray(new.c_kv[1, 1]))
  assert np.count_nonzero(pool.any(axis=-1)) == 5  # the padding token went nowhere
  contiguous = as_contiguous(out)
  assert contiguous.c_kv.shape == (2, 12, 32)
  np.testing.assert_array_equal(contiguous.c_kv[0, 3:6], new.c_kv[0])


@pytest.mark.parametrize("attention,cache_dtype", [  # MLA's float pool also runs in the engine
    pytest.param("mla", None, marks=pytest.mark.slow), ("mla", "int8"), ("gqa", None)])
def test_model_over_pages_equals_contiguous_cache(attention, cache_dtype):
  """Chunked prefill then decode steps, paged vs contiguous: same logits (float32)."""
  cfg = variant(TINY_CONFIGS["q_lora"], decode_block_size=8, cache_dtype=cache_dtype,
                attention=attention, num_kv_heads=2 if attention == "gqa" else None)
  model = Transformer(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  rng = np.random.default_rng(1)
  b, page, m = 3, 4, 6
  contiguous = init_cache(cfg, b, page * m)
  paged = init_paged_cache(cfg, num_pages=b * m + 2, page_size=page, batch_size=b,
                           pages_per_sequence=m)
  table = np.random.default_rng(2).permutation(b * m + 2)[:b * m].reshape(b, m).astype(np.int32)
  paged = paged.replace(page_table=jnp.asarray(table))
  assert page_bytes(paged) * m == sum(x.nbytes for x in jax.tree_util.tree_leaves(
      contiguous.layers)) // b
  for t, num in ((5, [5, 3, 0]), (7, [7, 2, 6]), (1, [1, 1, 1]), (1, [1, 0, 1])):
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    num = jnp.asarray(num, jnp.int32)
    want, contiguous = model.apply({"params": params}, tokens, cache=contiguous, num_tokens=num)
    got, paged = model.apply({"params": params}, tokens, cache=paged, num_tokens=num)
    real = np.arange(t)[None, :] < np.asarray(num)[:, None]
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(paged.lengths, contiguous.lengths)
