"""The Pallas MLA decode kernels, run in interpret mode on CPU (the TPU kernel in the TPU
interpret mode that simulates VMEM, DMAs and semaphores; the GPU kernel in Pallas' generic
interpreter), equal the XLA flash-decoding path they replace: float32 to 1e-5 of the tensor's
scale; bfloat16 operands within bfloat16's rounding. Shapes are tiny: interpret mode is slow."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # the race detector's verdict
from jax.experimental.pallas import tpu as pltpu

from mla_jax.cache import (BF16_BITS, dequantize_block, latent_operand, quantize, store_float,
                           LatentCache)
from mla_jax.kernels import mla_decode as kernels
from mla_jax.layers import flash_decode, paged_attention
from mla_jax.kinds import init_cache, init_paged_cache
from mla_jax.layers.flash_decode import normalize
from mla_jax.model import Transformer

from tests.helpers import TINY_CONFIGS, rel_err, variant

TOL = 1e-5  # float32, relative to each tensor's scale
# bfloat16 operands: the kernel rounds the scaled queries and the probabilities to bfloat16
# (8 bits of mantissa) before its dots, where the XLA path keeps them float32.
BF16_TOL = 2 ** -6
PLATFORMS = ("tpu", "gpu")
# The TPU kernel's DMAs run as soon as they start (so a copy into the buffer being read would
# corrupt it) and a happens-before race detector watches every buffer.
TPU_INTERPRET = pltpu.InterpretParams(dma_execution_mode="eager", detect_races=True)


def _interpret(platform: str):
  return TPU_INTERPRET if platform == "tpu" else True
B, H, C, R = 4, 4, 32, 16  # C, R powers of 2 >= 16: the GPU kernel's smallest shapes


def _queries(rng, t: int, lengths, dtype=jnp.float32):
  q_lat = jnp.asarray(rng.normal(size=(len(lengths), t, H, C)), dtype)
  q_rope = jnp.asarray(rng.normal(size=(len(lengths), t, H, R)), dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  positions = jnp.maximum(lengths[:, None] - t + jnp.arange(t)[None], 0)  # the last T tokens
  return q_lat, q_rope, lengths, positions


def _latents(rng, lengths, seq: int) -> tuple[np.ndarray, np.ndarray]:
  """float32 c_kv [B,S,C], k_rope [B,S,R] with NaN in every slot past a row's length."""
  c_kv = rng.normal(size=(len(lengths), seq, C)).astype(np.float32)
  k_rope = rng.normal(size=(len(lengths), seq, R)).astype(np.float32)
  for row, n in enumerate(lengths):
    c_kv[row, n:] = np.nan
    k_rope[row, n:] = np.nan
  return c_kv, k_rope


def _assert_partials_equal(got, expected, tol: float) -> None:
  races = interpret_pallas_call.races
  assert races is None or not races.races_found
  m, l, acc = got
  m_ref, l_ref, acc_ref = expected
  out, out_ref = normalize(l, acc), normalize(l_ref, acc_ref)
  assert np.isfinite(np.asarray(out)).all()  # NaN in empty slots never leaks
  seen = np.asarray(l_ref) > 0
  np.testing.assert_array_equal(np.asarray(l) > 0, seen)  # same queries see something
  assert rel_err(out, out_ref) <= tol
  assert rel_err(np.where(seen, m, 0), np.where(seen, m_ref, 0)) <= tol
  assert rel_err(l, l_ref) <= tol
  assert np.all(np.asarray(out)[~seen] == 0)  # a query that sees nothing gives zeros


# Lengths: empty, mid-block, a block's end, the last block clamped (TPU) / masked (GPU).
LENGTHS, SEQ = [0, 5, 16, 37], 40


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("t,splits", [(1, 1), (4, 1), (1, 3), (4, 2)])
def test_contiguous_float32_equals_xla(platform, t, splits):
  rng = np.random.default_rng(t * 10 + splits)
  q_lat, q_rope, lengths, positions = _queries(rng, t, LENGTHS)
  c_kv, k_rope = map(jnp.asarray, _latents(rng, LENGTHS, SEQ))
  expected = flash_decode.mla_decode_partials(q_lat, q_rope, c_kv, k_rope, lengths, positions,
                                              scale=0.3, block_size=16)
  got = kernels.mla_decode_partials(q_lat, q_rope, c_kv, k_rope, lengths, positions, scale=0.3,
                                    block_size=16, num_splits=splits, platform=platform,
                                    interpret=_interpret(platform))
  _assert_partials_equal(got, expected, TOL)
  assert float(jnp.abs(got[2][0]).max()) == 0.0 and bool(jnp.all(got[0][0] == -jnp.inf))


def _quantized(c_kv: np.ndarray, kind: str) -> dict:
  values, scale = quantize(jnp.nan_to_num(jnp.asarray(c_kv)), kind)
  empty = np.isnan(c_kv[..., :1])  # [B,S,1]: slots past the length
  return {"values": values, "scale": jnp.where(empty, jnp.nan, scale)}  # NaN scales there


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("cache,query_dtype,tol", [
    ("bfloat16", jnp.float32, BF16_TOL),
    ("int8", jnp.float32, TOL),  # float32 dots over the codec's dequantized values
    ("int4", jnp.float32, TOL),
    ("int8", jnp.bfloat16, BF16_TOL),  # a bfloat16 model: bfloat16 dots
])
def test_contiguous_stored_latents_equal_xla(platform, cache, query_dtype, tol):
  rng = np.random.default_rng(3)
  q_lat, q_rope, lengths, positions = _queries(rng, 2, LENGTHS, query_dtype)
  c_kv, k_rope = _latents(rng, LENGTHS, SEQ)
  rope = store_float(jnp.asarray(k_rope), BF16_BITS)  # as the cache stores it: bfloat16 bits
  if cache == "bfloat16":
    latent, decode = store_float(jnp.asarray(c_kv), BF16_BITS), None
  else:
    latent, decode = _quantized(c_kv, cache), dequantize_block
  expected = flash_decode.mla_decode_partials(q_lat, q_rope, latent, rope, lengths, positions,
                                              scale=0.3, block_size=16, dequantize=decode)
  got = kernels.mla_decode_partials(q_lat, q_rope, latent, rope, lengths, positions, scale=0.3,
                                    block_size=16, dequantize=decode, num_splits=2,
                                    platform=platform, interpret=_interpret(platform))
  _assert_partials_equal(got, expected, tol)


def _pool(x: np.ndarray, table: np.ndarray, num_pages: int, fill) -> np.ndarray:
  """A contiguous [B,S,...] array laid into a pool [P,page,...] through table [B,S/page]; the
  pages no sequence uses hold `fill` (NaN for floats: it must never reach a result)."""
  page = x.shape[1] // table.shape[1]
  pool = np.full((num_pages, page) + x.shape[2:], fill, x.dtype)
  for row in range(table.shape[0]):
    for j, entry in enumerate(table[row]):
      if entry < num_pages:
        pool[entry] = x[row, j * page:(j + 1) * page]
  return pool


def _paged_case(rng, page: int, seq: int):
  """A paged cache with lengths ending mid-page, an empty row, NO_PAGE table entries past each
  row's pages, and rows 1 and 2 sharing their first page (a shared prompt prefix)."""
  lengths = [0, 2 * page + 3, page + 1, seq]
  c_kv, k_rope = _latents(rng, lengths, seq)
  c_kv[2, :page], k_rope[2, :page] = c_kv[1, :page], k_rope[1, :page]  # the same first page
  per_row = seq // page
  num_pages = len(lengths) * per_row + 3
  table = rng.permutation(num_pages)[:len(lengths) * per_row].reshape(len(lengths), per_row)
  table[2, 0] = table[1, 0]  # shared
  for row, n in enumerate(lengths):
    table[row, -(-n // page):] = num_pages  # NO_PAGE past the row's pages
  return lengths, c_kv, k_rope, table.astype(np.int32), num_pages


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("cache,t,splits,pages_per_block", [
    ("float32", 1, 1, 2), ("float32", 4, 2, 1), ("int8", 1, 2, 2), ("int4", 4, 1, 2)])
def test_paged_equals_xla(platform, cache, t, splits, pages_per_block):
  rng = np.random.default_rng(splits * 10 + pages_per_block)
  page, seq = 16, 64
  lengths, c_kv, k_rope, table, num_pages = _paged_case(rng, page, seq)
  q_lat, q_rope, lengths, positions = _queries(rng, t, lengths)
  rope = jnp.asarray(_pool(k_rope, table, num_pages, np.nan))
  if cache == "float32":
    latent, decode = jnp.asarray(_pool(c_kv, table, num_pages, np.nan)), None
  else:
    q = _quantized(c_kv, cache)
    latent = {"values": jnp.asarray(_pool(np.asarray(q["values"]), table, num_pages, 0)),
              "scale": jnp.asarray(_pool(np.asarray(q["scale"]), table, num_pages, np.nan))}
    decode = dequantize_block
  args = (q_lat, q_rope, latent, rope, jnp.asarray(table), lengths, positions)
  expected = paged_attention.paged_mla_decode_partials(
      *args, scale=0.3, pages_per_block=pages_per_block, dequantize=decode)
  got = kernels.paged_mla_decode_partials(*args, scale=0.3, pages_per_block=pages_per_block,
                                          dequantize=decode, num_splits=splits,
                                          platform=platform, interpret=_interpret(platform))
  _assert_partials_equal(got, expected, TOL)


def test_splits_cover_a_row_longer_than_their_blocks():
  """More splits than a row has blocks: the empty splits contribute nothing."""
  rng = np.random.default_rng(5)
  q_lat, q_rope, lengths, positions = _queries(rng, 1, [3, 40])
  c_kv, k_rope = map(jnp.asarray, _latents(rng, [3, 40], SEQ))
  expected = flash_decode.mla_decode_partials(q_lat, q_rope, c_kv, k_rope, lengths, positions,
                                              scale=0.5)
  got = kernels.mla_decode_partials(q_lat, q_rope, c_kv, k_rope, lengths, positions, scale=0.5,
                                    block_size=8, num_splits=4, platform="tpu",
                                    interpret=TPU_INTERPRET)
  _assert_partials_equal(got, expected, TOL)


def test_invalid_arguments_are_named():
  rng = np.random.default_rng(0)
  q_lat, q_rope, lengths, positions = _queries(rng, 1, [3, 5])
  c_kv, k_rope = map(jnp.asarray, _latents(rng, [3, 5], 16))
  args = (q_lat, q_rope, c_kv, k_rope, lengths, positions)
  for options, message in [
      (dict(platform="cpu"), "platform='cpu' is invalid"),
      (dict(num_splits=0), "num_splits=0 is invalid"),
      (dict(block_size=12, platform="tpu"), "multiple of 8"),
      (dict(block_size=24, platform="gpu"), "power of 2 >= 16"),
      (dict(dequantize=lambda block: block), "dequantize was given for a float latent")]:
    with pytest.raises(ValueError, match=message):
      kernels.mla_decode_partials(*args, scale=1.0, interpret=True, **options)
  quantized = latent_operand(LatentCache(c_kv=jnp.zeros((2, 16, C), jnp.int8), k_rope=k_rope,
                                         c_kv_scale=jnp.ones((2, 16, 1))))[0]
  with pytest.raises(ValueError, match="dequantize_block"):
    kernels.mla_decode_partials(q_lat, q_rope, quantized, k_rope, lengths, positions, scale=1.0,
                                dequantize=lambda block: block["values"], interpret=True)
  odd = jnp.zeros((2, 1, H, 24))  # a latent width the GPU kernel cannot load
  with pytest.raises(ValueError, match="kv_lora_rank / planes=24"):
    kernels.mla_decode_partials(odd, q_rope, jnp.zeros((2, 16, 24)), k_rope, lengths, positions,
                                scale=1.0, platform="gpu", interpret=True)


def test_platform_choice():
  assert kernels.target_platform() == "cpu"
  assert not kernels.uses_pallas("auto") and kernels.uses_pallas("pallas")
  assert not kernels.uses_pallas("xla")
  with kernels.kernel_platform("gpu"):
    assert kernels.target_platform() == "gpu" and kernels.uses_pallas("auto")
    assert kernels.default_block_size() == kernels.DEFAULT_BLOCK_SIZES["gpu"]
  assert kernels.target_platform() == "cpu"
  with pytest.raises(ValueError, match="platform='cuda' is invalid"):
    with kernels.kernel_platform("cuda"):
      pass


# ---- through the model ---------------------------------------------------------------------

def _steps(cfg, params, cache, tokens_by_step):
  """The model's logits over a cache for each (tokens [B,T], num_tokens [B]) step in turn."""
  apply = jax.jit(Transformer(cfg).apply)
  out = []
  for tokens, num in tokens_by_step:
    logits, cache = apply({"params": params}, tokens, cache=cache, num_tokens=num)
    out.append(np.asarray(logits))
  return out


@pytest.mark.parametrize("cache_dtype,paged", [(None, False), ("int8", True)])
def test_model_with_the_kernel_equals_xla(cache_dtype, paged):
  """A prefill chunk with ragged (and zero) token counts, then a one-token step, YaRN on (its
  softmax scale reaches the kernel): the logits with decode_kernel=pallas (the TPU kernel,
  interpreted) equal decode_kernel=xla's."""
  cfg = variant(TINY_CONFIGS["q_lora_yarn_5_heads"], num_layers=1, cache_dtype=cache_dtype,
                decode_kernel_block_size=8, decode_kv_splits=2)
  params = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  rng = np.random.default_rng(4)
  b, page, m = 3, 4, 6
  if paged:
    cache = init_paged_cache(cfg, num_pages=b * m + 2, page_size=page, batch_size=b,
                             pages_per_sequence=m)
    table = rng.permutation(b * m + 2)[:b * m].reshape(b, m).astype(np.int32)
    cache = cache.replace(page_table=jnp.asarray(table))
  else:
    cache = init_cache(cfg, b, page * m)
  steps = [(jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32),
            jnp.asarray(num, jnp.int32)) for t, num in ((11, [11, 5, 0]), (1, [1, 1, 1]))]
  want = _steps(variant(cfg, decode_kernel="xla"), params, cache, steps)
  got = _steps(variant(cfg, decode_kernel="pallas"), params, cache, steps)
  for (tokens, num), w, g in zip(steps, want, got):
    real = np.arange(tokens.shape[1])[None, :] < np.asarray(num)[:, None]
    assert rel_err(g[real], w[real]) <= TOL
