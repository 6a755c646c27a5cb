"""`bench spec --quick`: plain and speculative rows for each batch, greedy checked identical,
the acceptance per draft position and the speed-up arithmetic, the V3 report's figures beside."""

import pytest

from mla_jax.cli import main
from tests.bench.helpers import check_header, rows, run_suite


def test_spec_rows(tmp_path):
  raw = run_suite("spec", tmp_path, "--batch", "2", "--k", "2")
  table = rows(raw)
  assert [(r["batch"], r["k"]) for r in table] == [(2, 0), (2, 2)]
  for row in table:
    plain = next(r for r in table if r["batch"] == row["batch"] and r["k"] == 0)
    assert row["speedup"] == pytest.approx(row["tokens_per_s"] / plain["tokens_per_s"])
    assert row["tokens_per_s"] == pytest.approx(row["batch"] * 12 / row["seconds"])
    assert row["min_tokens_per_s"] <= row["tokens_per_s"] <= row["max_tokens_per_s"]
    assert row["roofline_ms"] > 0 and row["bound"] == "memory"
    if row["k"]:
      assert row["identical"] is True and len(row["acceptance"]) == row["k"]
      assert 1 <= row["tokens_per_step"] <= row["k"] + 1
      assert row["steps"] <= 11  # at least one token per verify step after the prefill's
      assert row["break_even"] == pytest.approx(row["step_ms"] / plain["step_ms"])
    else:
      assert row["break_even"] == "-"
  assert "85%-90% of second tokens accepted, 1.8x tokens/s" in raw["markdown"]
  check_header(raw, "spec")


def test_a_missing_checkpoint_names_the_training_command(tmp_path, capsys):
  assert main(["bench", "spec", "--quick", "--out", str(tmp_path),
               "--checkpoint", str(tmp_path / "none")]) == 2
  err = capsys.readouterr().err
  assert "does not exist: train the model first with `mla-jax train configs/tiny_mtp.yaml`" in err
