"""`bench quality --quick`: the library's train, same data and tokens, loss next to cache bytes."""

import math

import pytest

from tests.bench.helpers import check_header, rows, run_suite


def test_quality_rows(tmp_path):
  raw = run_suite("quality", tmp_path, "--variants", "MLA,MQA")
  mla, mqa = rows(raw)
  assert (mla["variant"], mqa["variant"]) == ("MLA", "MQA")
  assert (mla["kv_bytes_per_token"], mqa["kv_bytes_per_token"]) == (48 * 4, 80 * 4)
  for row in (mla, mqa):
    assert 0 < row["val_loss"] < math.log(260) + 1  # 3 steps: near a uniform guess, finite
    assert row["perplexity"] == pytest.approx(math.exp(row["val_loss"]))
    assert row["seeds"] == 1 and row["spread"] == 0
  assert mqa["vs_mla"] == pytest.approx(mqa["val_loss"] - mla["val_loss"])
  assert (mla["verdict"], mqa["verdict"]) == ("(reference)", "one seed: noise unknown")
  assert "384 training tokens" in raw["markdown"]  # 3 steps x 8 x 16
  check_header(raw, "quality")
