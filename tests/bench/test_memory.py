"""The memory table against the DeepSeek-V2 paper's Table 1 formulas, number by number."""

import pytest

from tests.bench.helpers import check_header, rows, run_suite


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
  return run_suite("memory", tmp_path_factory.mktemp("bench"))


def table1(attention, layers, n_h=None, n_g=None, d_h=128, d_c=512, d_r=64):
  """Table 1 of arXiv:2405.04434: KV cache elements per token, all layers."""
  return {"MHA": 2 * (n_h or 0) * d_h * layers, "GQA-8": 2 * (n_g or 0) * d_h * layers,
          "MQA": 2 * d_h * layers, "MLA": (d_c + d_r) * layers}[attention]


SHAPES = {"DeepSeek 67B": (95, 64), "DeepSeek-V2": (60, 128), "DeepSeek-V2-Lite": (27, 16),
          "DeepSeek-V3": (61, 128)}


def test_every_row_equals_its_table1_formula(memory):
  table = rows(memory)
  assert len(table) == 1 + 3 * 5
  for row in table:
    layers, heads = SHAPES[row["model"]]
    expected = table1(row["attention"], layers, n_h=heads, n_g=8)
    assert row["layers"] == layers
    assert row["elements_per_token"] == expected == row["table1_elements"], row
    assert row["elements_per_token_per_layer"] * layers == expected
    bits = 6 if row["precision"] == "6 bits" else 16  # every preset and the 67B are bf16
    assert row["bytes_per_token"] == expected * bits / 8
    assert row["bytes_per_token_per_layer"] == expected // layers * bits / 8


def test_paper_headline_numbers(memory):
  table = rows(memory)
  base = table[0]
  assert (base["model"], base["attention"], base["elements_per_token"]) == (
      "DeepSeek 67B", "GQA-8", 194_560)
  v2 = [r for r in table if r["model"] == "DeepSeek-V2" and r["attention"] == "MLA"]
  bf16, six_bits = v2
  assert bf16["bytes_per_token_per_layer"] == 1_152 and bf16["elements_per_token"] == 34_560
  assert bf16["reduction"] == "82.2%"
  assert bf16["reduction_vs_67b"] == pytest.approx(1 - 34_560 / 194_560)
  assert six_bits["bytes_per_token"] == 25_920 and six_bits["reduction"] == "93.3%"
  assert six_bits["reduction_vs_67b"] == pytest.approx(1 - 34_560 * 6 / 8 / (194_560 * 2))
  md = memory["markdown"]
  for text in ("| DeepSeek-V2 | MLA | c_kv 512 + k_rope 64 | bfloat16 | 576 | 1,152 | 34,560 |",
               "| DeepSeek 67B | GQA-8 | 8 x (k 128 + v 128) | bfloat16 | 2,048 | 4,096 | 194,560 ",
               "82.2%", "93.3%"):
    assert text in md


def test_header(memory):
  check_header(memory, "memory")


def test_missing_presets_are_one_clear_error(tmp_path, capsys):
  from mla_jax.cli import main

  assert main(["bench", "memory", "--configs", str(tmp_path), "--out", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("mla-jax: error: --configs") and "deepseek_v2.yaml" in err
