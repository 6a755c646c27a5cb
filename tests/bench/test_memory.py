"""The memory table against the DeepSeek-V2 paper's Table 1 formulas, number by number."""

import dataclasses

import pytest

from mla_jax.bench.memory import CONFIGS, PRESETS
from mla_jax.kinds import cache_bytes_per_token
from mla_jax.config import load_config
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


def stored_as(row):
  """'bfloat16', '6 bits', 'int8' or 'int4' (the quantized rows name their parts after it)."""
  return row["precision"].split(" c_kv")[0]


def test_every_row_equals_its_table1_formula(memory):
  table = rows(memory)
  assert len(table) == 1 + 3 * 7
  for row in table:
    layers, heads = SHAPES[row["model"]]
    expected = table1(row["attention"], layers, n_h=heads, n_g=8)
    assert row["layers"] == layers
    assert row["elements_per_token"] == expected == row["table1_elements"], row
    assert row["elements_per_token_per_layer"] * layers == expected
    if stored_as(row) in ("int8", "int4"):  # scales change the bytes: checked below
      continue
    bits = 6 if row["precision"] == "6 bits" else 16  # every preset and the 67B are bf16
    assert row["bytes_per_token"] == expected * bits / 8
    assert row["bytes_per_token_per_layer"] == expected // layers * bits / 8


def test_paper_headline_numbers(memory):
  table = rows(memory)
  base = table[0]
  assert (base["model"], base["attention"], base["elements_per_token"]) == (
      "DeepSeek 67B", "GQA-8", 194_560)
  v2 = [r for r in table if r["model"] == "DeepSeek-V2" and r["attention"] == "MLA"]
  assert [stored_as(r) for r in v2] == ["bfloat16", "int8", "int4", "6 bits"]
  bf16, _, _, six_bits = v2
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


def test_quantized_rows_count_latent_scale_and_bf16_rope_bytes(memory):
  """int8: L (C + 4 + 2R) bytes per token; int4: L (C/2 + 4 + 2R): the latent at 1 or 1/2 byte,
  one float32 scale per token (mla_jax/cache.py: c_kv_scale [B,S,1] float32), k_rope in bf16."""
  table = rows(memory)
  base = table[0]["bytes_per_token"]
  c, r = 512, 64
  latent_bytes = {"int8": c, "int4": c // 2}
  quantized = [row for row in table if stored_as(row) in latent_bytes]
  assert [(row["model"], stored_as(row)) for row in quantized] == [
      (name, kind) for name, _ in PRESETS for kind in ("int8", "int4")]
  for row, (name, filename) in zip(quantized, [p for p in PRESETS for _ in range(2)]):
    layers = SHAPES[row["model"]][0]
    per_layer = latent_bytes[stored_as(row)] + 4 + 2 * r
    assert row["bytes_per_token_per_layer"] == per_layer
    assert row["bytes_per_token"] == layers * per_layer
    # the same count as the library's own cache_bytes_per_token of that cache_dtype
    config = dataclasses.replace(load_config(CONFIGS / filename).model,
                                 cache_dtype=stored_as(row))
    assert cache_bytes_per_token(config) == row["bytes_per_token"]
    assert row["reduction_vs_67b"] == pytest.approx(1 - row["bytes_per_token"] / base)
  v2 = {stored_as(row): row for row in quantized if row["model"] == "DeepSeek-V2"}
  assert v2["int8"]["bytes_per_token"] == 60 * (512 + 4 + 128) == 38_640
  assert v2["int4"]["bytes_per_token"] == 60 * (256 + 4 + 128) == 23_280
  assert v2["int4"]["reduction_vs_67b"] >= 0.94 and v2["int4"]["reduction"] == "94.0%"
  assert v2["int8"]["reduction"] == "90.1%"
  assert ("| DeepSeek-V2 | MLA | c_kv 512 + scale 1 + k_rope 64 | int4 c_kv, float32 scale, "
          "bfloat16 k_rope | 576 | 388 | 34,560 | 23,280 |") in memory["markdown"]
  assert "int4 23,280 bytes (94.0% smaller than DeepSeek 67B)" in memory["markdown"]


def test_header(memory):
  check_header(memory, "memory")


def test_missing_presets_are_one_clear_error(tmp_path, capsys):
  from mla_jax.cli import main

  assert main(["bench", "memory", "--configs", str(tmp_path), "--out", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("mla-jax: error: --configs") and "deepseek_v2.yaml" in err
