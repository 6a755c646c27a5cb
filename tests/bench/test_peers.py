"""`bench peers --quick`: mla-jax and transformers' DeepseekV2 on one random checkpoint, the
same logits, both workloads timed interleaved, and the ratio from the medians."""

import pytest

from tests.bench.helpers import check_header, rows, run_suite

pytest.importorskip("torch", reason="bench peers compares with PyTorch: pip install torch==2.13.0")
pytest.importorskip("transformers", reason='pip install "transformers>=5.24,<6"')


def test_peers_rows(tmp_path):
  raw = run_suite("peers", tmp_path)
  prefill, training = rows(raw)
  assert (prefill["workload"], prefill["tokens"]) == ("prefill", "1 x 64")
  assert (training["workload"], training["tokens"]) == ("training step", "2 x 32")
  for row in (prefill, training):
    for side in ("hf", "ours"):
      assert row[f"{side}_min"] <= row[f"{side}_ms"] <= row[f"{side}_max"]
    assert row["hf_over_ours"] == pytest.approx(row["hf_ms"] / row["ours_ms"])
  notes = raw["tables"][0]["notes"]
  agreement = next(n for n in notes if n.startswith("Same checkpoint"))
  assert float(agreement.split("agree to ")[1].split(" ")[0]) < 1e-5  # the same function
  assert "sdpa attention" in notes[0] and "with 2 threads" in notes[0]
  check_header(raw, "peers")
