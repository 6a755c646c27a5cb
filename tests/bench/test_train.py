"""`bench train --quick`: the library's Trainer, equal parameter counts, tokens/s arithmetic."""

import pytest

from tests.bench.helpers import check_header, rows, run_suite

NO_ATTENTION = ("--attention-lengths", "none", "--block-sizes", "none")


def test_train_rows(tmp_path):
  raw = run_suite("train", tmp_path, "--variants", "MLA,MQA", "--moe", "off", *NO_ATTENTION)
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


@pytest.mark.slow  # the MoE FLOPs are counted in tests/bench/test_compute.py too
def test_moe_rows_count_the_active_parameters(tmp_path):
  """The MoE table: a DeepSeekMoE model (quick: 8 routed experts, top-2, 1 shared) against dense
  MHA models of its total and of its active parameters; FLOPs from XLA's count of each train
  step follow the active parameters, not the total."""
  from mla_jax.bench.moe import active_param_count
  from mla_jax.bench.train import QUICK_MOE_MODEL

  raw = run_suite("train", tmp_path, "--variants", "MLA", *NO_ATTENTION)
  moe, same_total, same_active = rows(raw, 1)
  assert moe["params"] == same_total["params"] == same_total["active_params"] or (
      abs(moe["params"] - same_total["params"]) / moe["params"] < 0.02)
  assert moe["active_params"] == active_param_count(QUICK_MOE_MODEL) < moe["params"]
  assert abs(same_active["params"] - moe["active_params"]) / moe["active_params"] < 0.02
  # Fewer FLOPs than the dense model of equal total size; about those of equal active size.
  assert moe["flops_per_token"] < 0.9 * same_total["flops_per_token"]
  assert moe["flops_per_token"] == pytest.approx(same_active["flops_per_token"], rel=0.15)
  for row in (moe, same_total, same_active):
    assert row["flops_vs_moe"] == pytest.approx(row["flops_per_token"] / moe["flops_per_token"])
    assert row["compile_s"] > 0.01
  assert "fewer training FLOPs per token" in raw["markdown"]


@pytest.mark.slow  # compiles and times five train steps
def test_naive_against_flash_attention_table_and_block_sizes(tmp_path):
  """The attention tables (T = 48; blocks 16 x 16 and 32 x 32): both paths' training steps timed
  with XLA's peak memory and compile time of each compiled step, and their prefills, each judged
  against the naive program's roofline, the
  ratios from those figures, and the block-size table naming its fastest pair."""
  raw = run_suite("train", tmp_path, "--variants", "MLA", "--moe", "off",
                  "--attention-lengths", "48", "--block-size-len", "48")
  lengths, blocks = rows(raw, 1), rows(raw, 2)
  assert [r["seq_len"] for r in lengths] == [48]
  for row in lengths:
    for path in ("naive", "flash_attention"):
      assert row[f"{path}_min"] <= row[f"{path}_ms"] <= row[f"{path}_max"]
      assert row[f"{path}_mib"] > 0 and row[f"{path}_compile_s"] > 0
      assert row[f"{path}_of_roofline"] == pytest.approx(row["roofline_ms"] / row[f"{path}_ms"])
      prefill = f"prefill_{path}"
      assert row[f"{prefill}_min"] <= row[f"{prefill}_ms"] <= row[f"{prefill}_max"]
      assert row[f"{prefill}_of_roofline"] == pytest.approx(
          row["prefill_roofline_ms"] / row[f"{prefill}_ms"])
    assert row["prefill_bound"] in ("memory", "compute") and row["prefill_roofline_ms"] > 0
    assert row["prefill_ratio"] == pytest.approx(
        row["prefill_flash_attention_ms"] / row["prefill_naive_ms"])
    assert row["bound"] in ("memory", "compute") and row["roofline_ms"] > 0
    assert row["time_ratio"] == pytest.approx(row["flash_attention_ms"] / row["naive_ms"])
    assert row["memory_ratio"] == pytest.approx(row["naive_mib"] / row["flash_attention_mib"])
  assert [(r["block_q"], r["block_k"]) for r in blocks] == [(16, 16), (32, 32)]
  best = min(blocks, key=lambda r: r["step_ms"])
  assert f"The fastest here: {best['block_q']} x {best['block_k']}" in raw["markdown"]
  assert "Training step against T: naive and flash attention, batch 1" in raw["markdown"]


@pytest.mark.parametrize("option,value,message", [
    ("--block-sizes", "16x", "--block-sizes '16x' is invalid: expected QxK pairs"),
    ("--attention-lengths", "0", "--attention-lengths '0' is invalid"),
    ("--attention-repeats", "0", "--attention-repeats 0 is invalid: must be >= 1"),
])
def test_attention_options_are_checked(tmp_path, capsys, option, value, message):
  from mla_jax.cli import main

  assert main(["bench", "train", "--quick", "--out", str(tmp_path), "--variants", "MLA",
               "--moe", "off", option, value]) == 2
  assert message in capsys.readouterr().err


@pytest.mark.slow
def test_mtp_rows_price_the_mtp_modules(tmp_path):
  """The MTP table: the MLA model with 0, 1 and 2 MTP modules; each module adds parameters (an
  eh_proj, a block and three norms) and FLOPs, and the ratios are taken in the same run."""
  from mla_jax.bench import parse_suite_args
  from mla_jax.bench.common import count_params
  from mla_jax.bench.train import model_config

  raw = run_suite("train", tmp_path, "--variants", "MLA", "--moe", "off", "--mtp", "on",
                  "--attention-lengths", "none", "--block-sizes", "none")
  plain, one, two = rows(raw, 1)
  assert [r["mtp_layers"] for r in (plain, one, two)] == [0, 1, 2]
  base = model_config(parse_suite_args("train", ["--quick"]))
  d = base.hidden_size
  block = (count_params(base) - 2 * base.vocab_size * d - d) // base.num_layers
  assert one["params"] - plain["params"] == block + 2 * d * d + 3 * d
  assert two["params"] - one["params"] == one["params"] - plain["params"]
  assert plain["flops_per_token"] < one["flops_per_token"] < two["flops_per_token"]
  for row in (plain, one, two):
    assert row["flops_vs_plain"] == pytest.approx(row["flops_per_token"] / plain["flops_per_token"])
    assert row["time_vs_plain"] == pytest.approx(row["step_ms"] / plain["step_ms"])
  assert "more FLOPs per token" in raw["markdown"]
