"""`bench train --quick`: the library's Trainer, equal parameter counts, tokens/s arithmetic."""

import pytest

from tests.bench.helpers import check_header, rows, run_suite


def test_train_rows(tmp_path):
  raw = run_suite("train", tmp_path, "--variants", "MLA,MQA")
  mla, mqa = rows(raw)
  assert (mla["variant"], mqa["variant"]) == ("MLA", "MQA")
  assert abs(mla["params"] - mqa["params"]) / mla["params"] < 0.01
  assert mla["mlp_width"] == 384
  # The tiny model's cache, one layer (quick), float32: MLA 32 + 16, MQA 1 x (48 + 32).
  assert (mla["kv_bytes_per_token"], mqa["kv_bytes_per_token"]) == (48 * 4, 80 * 4)
  for row in (mla, mqa):
    assert row["tokens_per_s"] == pytest.approx(8 * 16 / row["step_ms"] * 1e3)
    assert row["min_ms"] <= row["step_ms"] <= row["max_ms"]
  assert mqa["vs_mla"] == pytest.approx(mqa["tokens_per_s"] / mla["tokens_per_s"])
  assert "42.5%" in raw["markdown"] and "MoE" in raw["markdown"]
  check_header(raw, "train")
