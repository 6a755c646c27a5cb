"""`bench throughput --quick`: the largest batch a budget holds, and tokens/s via generate."""

import pytest

from tests.bench.helpers import check_header, rows, run_suite


def test_batch_fills_the_budget_and_ratio_is_against_mha(tmp_path):
  raw = run_suite("throughput", tmp_path, "--variants", "MLA,MLA int8,MLA int4,MHA")
  mla, int8, int4, mha = rows(raw)
  assert [r["cache_dtype"] for r in (mla, int8, int4, mha)] == [
      "float32", "int8", "int4", "float32"]
  # Quick model, 24-token context, float32, 1 layer: MLA caches 32 + 8, MHA 4 x (24 + 16);
  # int8 / int4: the latent at 1 or 1/2 byte + one float32 scale + the RoPE key in bfloat16;
  # plus the int32 length of the sequence.
  assert mla["bytes_per_sequence"] == 24 * (32 + 8) * 4 + 4
  assert int8["bytes_per_sequence"] == 24 * (32 + 4 + 8 * 2) + 4
  assert int4["bytes_per_sequence"] == 24 * (32 // 2 + 4 + 8 * 2) + 4
  assert mha["bytes_per_sequence"] == 24 * 4 * (24 + 16) * 4 + 4
  assert mla["batch"] < int8["batch"] < int4["batch"]
  for row in (mla, int8, int4, mha):
    assert row["batch"] == 256 * 1024 // row["bytes_per_sequence"]
    assert row["cache_bytes"] <= 256 * 1024 < row["cache_bytes"] + row["bytes_per_sequence"]
    assert row["tokens_per_s"] == pytest.approx(row["batch"] * 20 / row["seconds"])
  assert mla["vs_mha"] == pytest.approx(mla["tokens_per_s"] / mha["tokens_per_s"])
  assert "5.76x" in raw["markdown"] and "H800" in raw["markdown"]
  assert f"MLA int4: {int4['bytes_per_sequence'] / mla['bytes_per_sequence']:,.3f}x" in raw["markdown"]
  check_header(raw, "throughput")


def test_a_budget_too_small_is_one_clear_error(tmp_path, capsys):
  from mla_jax.cli import main

  assert main(["bench", "throughput", "--quick", "--budget", "1KiB", "--out", str(tmp_path)]) == 2
  assert capsys.readouterr().err.strip() == (
      "mla-jax: error: --budget 1KiB holds no MLA sequence: one takes 3,844 bytes at --context 24")
  assert main(["bench", "throughput", "--budget", "4 gigs", "--out", str(tmp_path)]) == 2
  assert "--budget '4 gigs' is invalid" in capsys.readouterr().err
