"""Every variant of every suite at --quick sizes (slow: the default suite runs subsets)."""

import pytest

from tests.bench.helpers import rows, run_suite

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("suite,expected", [
    ("decode", ["MLA flash", "MLA flash int8", "MLA flash int4", "MLA absorbed", "MLA naive",
                "MHA", "GQA-2", "MQA"]),
    ("throughput", ["MLA", "MLA int8", "MLA int4", "MHA", "GQA-2", "MQA"]),
    ("train", ["MLA", "MHA", "GQA-2", "MQA"]),
    ("quality", ["MLA", "MHA", "GQA-2", "MQA"]),
])
def test_all_variants(tmp_path, suite, expected):
  raw = run_suite(suite, tmp_path)
  assert [r["variant"] for r in rows(raw)] == expected
  params = [r["params"] for r in rows(raw) if "params" in r]
  if params:  # train and quality compare at equal parameter count
    assert max(params) - min(params) <= 0.01 * params[0]
