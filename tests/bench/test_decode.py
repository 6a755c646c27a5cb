"""`bench decode --quick`: rows, bytes from shapes, FLOPs from XLA, the baselines' path choice."""

import pytest

from mla_jax.sampling import DECODE_ATTN_IMPL
from tests.bench.helpers import check_header, rows, run_suite

VARIANTS = "MLA flash,MLA absorbed,MLA naive,GQA-8"


@pytest.fixture(scope="module")
def decode(tmp_path_factory):
  return run_suite("decode", tmp_path_factory.mktemp("bench"), "--variants", VARIANTS)


def test_rows_and_bytes_per_step(decode):
  steps = rows(decode)
  assert [(r["variant"], r["context"]) for r in steps] == [
      ("MLA flash", 32), ("MLA absorbed", 32), ("MLA naive", 32), ("GQA-2", 32)]
  flash, absorbed, naive, gqa = steps
  assert flash["path"] == DECODE_ATTN_IMPL == "flash"
  assert absorbed["path"] == "absorbed" and naive["path"] == "naive"
  assert flash["bytes_per_step"] == absorbed["bytes_per_step"]  # same cache, same weights
  # The quick model: 1 layer, latent 32 + rope 8 (MLA); 2 KV heads of keys 16 + 8 and values 16.
  assert absorbed["cache_mb"] * 1e6 == pytest.approx(32 * (32 + 8) * 4)
  assert gqa["cache_mb"] * 1e6 == pytest.approx(32 * 2 * (24 + 16) * 4)
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
  assert probe["speedup"] == pytest.approx(probe["library_ms"] / probe["head_major_ms"])
  assert "--variants 'MLA flash,MLA absorbed,MLA naive,GQA-8'" in decode["header"][3]
