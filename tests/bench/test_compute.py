"""`bench compute --quick`: FLOPs from XLA's cost analysis, MLA vs MHA at equal parameters."""

import pytest

from tests.bench.helpers import check_header, rows, run_suite


@pytest.fixture(scope="module")
def compute(tmp_path_factory):
  return run_suite("compute", tmp_path_factory.mktemp("bench"))


def test_functions_and_equal_parameters(compute):
  table = rows(compute)
  assert [(r["variant"], r["function"], r["path"]) for r in table] == [
      ("MLA", "training (fwd + bwd)", None), ("MLA", "prefill", "naive"),
      ("MLA", "prefill", "absorbed"), ("MLA", "decode step", "naive"),
      ("MLA", "decode step", "absorbed"), ("MHA", "training (fwd + bwd)", None),
      ("MHA", "prefill", "-"), ("MHA", "decode step", "-")]
  mla, mha = table[0]["params"], table[-1]["params"]
  assert abs(mla - mha) / mla < 0.01
  by = {(r["variant"], r["function"], r["path"]): r for r in table}
  # Training is about 3x a forward pass, and naive decode does more work than absorbed.
  assert 2.5 < (by["MLA", "training (fwd + bwd)", None]["flops_per_token"]
                / by["MLA", "prefill", "naive"]["flops_per_token"]) < 3.5
  assert (by["MLA", "decode step", "naive"]["flops_per_token"]
          > by["MLA", "decode step", "absorbed"]["flops_per_token"])
  for row in table:
    assert row["flops_per_token"] == pytest.approx(row["flops"] / row["tokens"])
  check_header(compute, "compute")


def test_absorbed_decode_does_about_4h_flops_per_cached_element(compute):
  grid = rows(compute, 1)
  assert [(r["heads"], r["context"]) for r in grid] == [(4, 16), (4, 32), (8, 16), (8, 32)]
  for row in grid:
    # float32: 4H FLOPs per cached element = H FLOPs per cached byte (plus softmax work).
    assert row["heads"] <= row["cache_intensity"] < 1.2 * row["heads"]
    assert row["intensity"] == pytest.approx(row["flops_per_step"] / row["bytes_per_step"])
    assert row["bound"] == ("compute" if row["intensity"] > row["ridge"] else "memory")
