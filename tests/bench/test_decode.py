"""`bench decode --quick`: rows, bytes from shapes, FLOPs from XLA, the baselines' path choice."""

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.bench.common import base_config, filled_cache
from mla_jax.bench.decode import parse_held_check
from mla_jax.bench.decode_blocks import parse_block_sizes
from mla_jax.kernels.mla_decode import kernel_platform
from mla_jax.cache import latent_values, load_float
from mla_jax.kinds import init_cache
from mla_jax.sampling import DECODE_ATTN_IMPL
from tests.bench.helpers import check_header, rows, run_suite

VARIANTS = "MLA flash,MLA flash int8,MLA flash int4,MLA absorbed,MLA naive,GQA-8"
# Bytes one token occupies in the quick model's one-layer cache (latent 32, RoPE key 8, float32
# model): float32 latent + key; int8 / packed int4 latent + one float32 scale + bfloat16 key.
TOKEN_BYTES = {"float32": (32 + 8) * 4, "int8": 32 + 4 + 8 * 2, "int4": 32 // 2 + 4 + 8 * 2}


@pytest.fixture(scope="module")
def decode(tmp_path_factory):
  return run_suite("decode", tmp_path_factory.mktemp("bench"), "--variants", VARIANTS)


def test_rows_and_bytes_per_step(decode):
  steps = rows(decode)
  assert [(r["variant"], r["context"]) for r in steps] == [
      ("MLA flash", 32), ("MLA flash int8", 32), ("MLA flash int4", 32), ("MLA absorbed", 32),
      ("MLA naive", 32), ("GQA-2", 32)]
  flash, int8, int4, absorbed, naive, gqa = steps
  assert flash["path"] == int8["path"] == int4["path"] == DECODE_ATTN_IMPL == "flash"
  assert [r["cache_dtype"] for r in steps] == ["float32", "int8", "int4"] + ["float32"] * 3
  assert absorbed["path"] == "absorbed" and naive["path"] == "naive"
  assert flash["bytes_per_step"] == absorbed["bytes_per_step"]  # same cache, same weights
  # The quick model: 1 layer, latent 32 + rope 8 (MLA); 2 KV heads of keys 16 + 8 and values 16.
  assert absorbed["cache_mb"] * 1e6 == pytest.approx(32 * (32 + 8) * 4)
  assert gqa["cache_mb"] * 1e6 == pytest.approx(32 * 2 * (24 + 16) * 4)
  for row in (flash, int8, int4):  # the quantized caches' real bytes: latent + scales + rope
    assert row["cache_mb"] * 1e6 == pytest.approx(32 * TOKEN_BYTES[row["cache_dtype"]])
    assert row["weights_mb"] == flash["weights_mb"]  # same model, only the cache differs
  for row in steps:
    assert row["bytes_per_step"] == pytest.approx((row["cache_mb"] + row["weights_mb"]) * 1e6)
    assert row["min_ms"] <= row["step_ms"] <= row["max_ms"]
    assert row["tokens_per_s"] == pytest.approx(1e3 / row["step_ms"])
    assert row["achieved_gb_s"] == pytest.approx(row["bytes_per_step"] / row["step_ms"] / 1e6)
    assert row["roofline_fraction"] == pytest.approx(row["roofline_ms"] / row["step_ms"])
    assert row["bound"] in ("memory", "compute") and row["compile_s"] > 0
    assert row["xla_bytes_accessed"] > 0 and row["gflops_per_step"] > 0
  # Re-expanding the latent is more work than attending over it: from XLA's own count.
  assert naive["gflops_per_step"] > absorbed["gflops_per_step"]


def test_held_check_times_an_oversized_cache_against_an_exact_one(decode):
  """--held-check 16,64 (the --quick default): each MLA flash variant's step on 64 slots holding
  16 tokens against 16 slots holding 16; bytes count the 16 held tokens only."""
  held = rows(decode, 3)
  assert [(r["variant"], r["tokens"], r["slots"]) for r in held] == [
      ("MLA flash", 16, 64), ("MLA flash int8", 16, 64), ("MLA flash int4", 16, 64)]
  weights = {r["variant"]: r["weights_mb"] * 1e6 for r in rows(decode)}
  for row in held:
    assert row["bytes_per_step"] == pytest.approx(
        weights[row["variant"]] + 16 * TOKEN_BYTES[row["cache_dtype"]])
    assert row["ratio"] == pytest.approx(row["oversized_ms"] / row["exact_ms"])
    assert row["exact_min_ms"] <= row["exact_ms"] <= row["exact_max_ms"]
    assert row["oversized_min_ms"] <= row["oversized_ms"] <= row["oversized_max_ms"]
    assert row["exact_xla_bytes"] > 0 and row["oversized_xla_bytes"] > 0
  assert "### A cache of 64 slots holding 16 tokens" in decode["markdown"]
  assert "int8 cache's flash step takes" in decode["markdown"]


def test_held_check_option():
  assert parse_held_check("none") is None and parse_held_check("2048,32768") == (2048, 32768)
  for bad in ("64,16", "16,16", "16", "16,32,64", "a,b"):
    with pytest.raises(ValueError, match="--held-check"):
      parse_held_check(bad)


def test_bad_held_check_is_one_clear_error_before_any_work(tmp_path, capsys):
  from mla_jax.cli import main

  assert main(["bench", "decode", "--quick", "--held-check", "4,64", "--out", str(tmp_path)]) == 2
  assert capsys.readouterr().err.strip() == (
      "mla-jax: error: --held-check 4 is invalid: must exceed the 7 steps timed "
      "(--repeats 5 + 2 warm-up)")
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("attention,dtype,kind", [
    ("mla", "float32", None), ("mla", "bfloat16", None), ("mla", "float32", "int8"),
    ("mla", "bfloat16", "int4"), ("gqa", "float32", None), ("gqa", "bfloat16", None)])
def test_filled_cache_has_the_real_cache_structure(attention, dtype, kind):
  """Random entries in the storage init_cache allocates (bfloat16 as bits, quantized latents
  with their scales), every slot finite and not all zero."""
  args = argparse.Namespace(quick=True, layers=2, dtype=dtype)
  config = dataclasses.replace(base_config(args, 16), attention=attention, cache_dtype=kind,
                               num_kv_heads=2 if attention == "gqa" else None)
  cache = filled_cache(config, 2, 16, 5, seed=0)
  like = jax.eval_shape(lambda: init_cache(config, 2, 16))
  assert jax.tree_util.tree_structure(cache) == jax.tree_util.tree_structure(like)
  for got, want in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(like)):
    assert (got.shape, got.dtype) == (want.shape, want.dtype)
  np.testing.assert_array_equal(cache.lengths, [5, 5])
  for layer in cache.layers:
    values = (jax.tree_util.tree_leaves(latent_values(layer)) if attention == "mla"
              else [load_float(layer.k), load_float(layer.v)])
    for x in values:
      assert bool(jnp.all(jnp.isfinite(x))) and float(jnp.std(x)) > 0.5


def test_summary_names_the_kept_path_and_the_ratio(decode):
  summary = {r["variant"]: r for r in rows(decode, 1)}
  gqa = summary["GQA-2"]
  assert all(path in gqa["alternatives"] for path in ("flash", "absorbed", "naive"))
  assert gqa["path"] in ("flash", "absorbed", "naive")
  assert summary["MLA flash"]["vs_mla"] == 1.0
  assert summary["MLA naive"]["vs_mla"] == pytest.approx(
      summary["MLA naive"]["step_ms"] / summary["MLA flash"]["step_ms"])
  assert "naive MLA step (re-expanding the whole latent) takes" in decode["markdown"]
  assert decode["header"][4].startswith("measured bandwidth: ")
  check_header(decode, "decode")
  (probe,) = rows(decode, 2)  # the baseline's key-cache layout, measured at the same context
  assert (probe["variant"], probe["context"], probe["kv_bytes"]) == ("GQA-2", 32, 32 * 2 * 24 * 4)
  assert probe["speedup"] == pytest.approx(probe["token_major_ms"] / probe["library_ms"])
  assert "The baselines' cache is head-major, [B,G,S,K]" in decode["markdown"]
  assert (f"--variants '{VARIANTS}' --kernel auto --block-sizes none --held-check 16,64"
          in decode["header"][3])


@pytest.mark.slow  # the decode bench runs by default through its other tests
def test_bf16_cache_row_and_block_sizes(tmp_path):
  """'MLA flash bf16': float32 weights, bfloat16 cache (2 bytes a value). --block-sizes times the
  flash step per decode_block_size; every block's FLOPs are counted (XLA counts a loop body
  once, so the suite counts a one-block compile): the same FLOPs whatever the block size."""
  raw = run_suite("decode", tmp_path, "--variants", "MLA flash,MLA flash bf16", "--held-check",
                  "none", "--block-sizes", "4,32", "--repeats", "1")
  flash, bf16 = rows(raw)
  assert (bf16["variant"], bf16["cache_dtype"], bf16["path"]) == ("MLA flash bf16", "bfloat16",
                                                                  "flash")
  assert bf16["cache_mb"] * 1e6 == pytest.approx(32 * (32 + 8) * 2)
  assert bf16["weights_mb"] == flash["weights_mb"]
  blocks = rows(raw, 2)
  assert [r["block"] for r in blocks] == [4, 32]
  for row in blocks:
    assert row["gflops_per_step"] == pytest.approx(flash["gflops_per_step"], rel=0.01)
    assert row["compile_s"] > 0.01  # compiled afresh, not a cached program
  assert "Tuned for cpu (xla path): decode_block_size=" in raw["markdown"]
  assert sum(row["picked"] for row in blocks) == 1


def test_pallas_kernel_rows_are_labelled_and_the_tuner_picks_a_block(tmp_path):
  """--kernel pallas on CPU: the MLA flash rows run the kernel (interpreted), say so, and take
  their FLOPs from the XLA loop's step; --block-sizes tune times the quick candidates."""
  raw = run_suite("decode", tmp_path, "--kernel", "pallas", "--variants",
                  "MLA flash int8,MLA absorbed", "--held-check", "none", "--block-sizes", "tune",
                  "--repeats", "1", "--contexts", "24")
  int8, absorbed = rows(raw)
  assert (int8["kernel"], absorbed["kernel"]) == ("pallas", "xla")  # only the flash rows
  assert int8["xla_bytes_accessed"] is None and absorbed["xla_bytes_accessed"] > 0
  assert int8["gflops_per_step"] == pytest.approx(absorbed["gflops_per_step"], rel=0.05)
  assert "NOT a speed measurement" in raw["header"][-1]
  assert "NOT a speed measurement" in raw["tables"][0]["title"]
  blocks = rows(raw, 2)
  assert [(r["block"], r["field"], r["kernel"], r["picked"]) for r in blocks] == [
      (16, "decode_kernel_block_size", "pallas", True)]  # the quick candidates up to 24 tokens
  assert "Tuned for cpu (pallas path): decode_kernel_block_size=" in raw["markdown"]
  assert "not a speed measurement" in raw["markdown"]


def test_tune_candidates_follow_the_backend_and_the_path():
  assert parse_block_sizes("tune", False, 32768, quick=False) == [64, 128, 256, 512, 1024]
  assert parse_block_sizes("tune", False, 200, quick=False) == [64, 128]
  assert parse_block_sizes("tune", True, 8, quick=False) == [8]
  with kernel_platform("gpu"):
    assert parse_block_sizes("tune", True, 4096, quick=False) == [16, 32, 64, 128, 256]
  with kernel_platform("tpu"):
    assert parse_block_sizes("tune", True, 100, quick=False) == [128]  # at least the smallest
  assert parse_block_sizes("64,16,64", True, 32, quick=False) == [16, 64]
  assert parse_block_sizes("none", True, 32, quick=True) == []
