"""The shared pieces: number formatting, sizes, variant selection, equal-parameter models,
timing arguments, and the reproducible command line."""

import dataclasses

import pytest

from mla_jax.bench import common
from mla_jax.config import ModelConfig


def test_fmt_uses_thousands_separators():
  assert common.fmt(34560) == "34,560"
  assert common.fmt(194560.0) == "194,560"
  assert common.fmt(0.012345) == "0.0123"
  assert common.fmt(None) == "-"


def test_parse_bytes():
  assert common.parse_bytes("4GiB", "--budget") == 4 * 2**30
  assert common.parse_bytes("256 MiB", "--budget") == 256 * 2**20
  assert common.parse_bytes("1.5KB", "--budget") == 1500
  with pytest.raises(ValueError, match="--budget '4XB' is invalid"):
    common.parse_bytes("4XB", "--budget")


def test_select_variants():
  names = ["MLA", "MHA", "GQA", "MQA"]
  assert common.select_variants(names, None) == names
  assert common.select_variants(names, "mqa, MLA") == ["MLA", "MQA"]  # the table's order
  with pytest.raises(ValueError, match="--variants 'mla,xyz' is invalid: choose from MLA, MHA"):
    common.select_variants(names, "mla,xyz")


@pytest.mark.parametrize("attention,kv_heads", [("mha", None), ("gqa", 2), ("mqa", None)])
def test_match_parameters_equalises_the_count(attention, kv_heads):
  mla = ModelConfig()
  baseline = common.match_parameters(
      mla, dataclasses.replace(mla, attention=attention, num_kv_heads=kv_heads))
  gap = lambda config: abs(common.count_params(config) - common.count_params(mla))  # noqa: E731
  for width in (baseline.intermediate_size - 1, baseline.intermediate_size + 1):
    assert gap(baseline) <= gap(dataclasses.replace(baseline, intermediate_size=width))
  assert gap(baseline) <= 3 * mla.hidden_size * mla.num_layers / 2


def test_match_parameters_refuses_what_it_cannot_match():
  small = ModelConfig(intermediate_size=1)
  with pytest.raises(ValueError, match="attention=mha: its attention alone has more"):
    common.match_parameters(small, dataclasses.replace(small, attention="mha"))


def test_time_calls_orders_and_validates():
  timing = common.time_calls(lambda: 1, repeats=3)
  assert timing.min_s <= timing.median_s <= timing.max_s and timing.repeats == 3
  with pytest.raises(ValueError, match="repeats=0"):
    common.time_calls(lambda: 1, repeats=0)


def test_roofline_names_the_binding_ceiling():
  ceilings = common.Ceilings(copy_bytes_per_s=1e9, matmul_flops_per_s=1e10, copy_mib=1,
                             matmul_n=8, dtype="float32")
  assert ceilings.roofline_s(2e9, 1e9) == (2.0, "memory")
  assert ceilings.roofline_s(1e8, 1e11) == (10.0, "compute")
  assert ceilings.ridge_flops_per_byte == 10
  faster_read = dataclasses.replace(ceilings, read_bytes_per_s=2e9)  # a read beats the copy
  assert faster_read.bandwidth == 2e9 and faster_read.roofline_s(2e9, 1e9) == (1.0, "memory")


def test_command_line_spells_out_every_option():
  from mla_jax.bench import command_line, parse_suite_args

  args = parse_suite_args("throughput", ["--budget", "1GiB"])
  from mla_jax.bench import throughput

  throughput.resolve_defaults(args)
  assert command_line(args.bench_parser, args) == (
      "mla-jax bench throughput --budget 1GiB --context 1024 --prompt-tokens 16 --layers 1 "
      f"--dtype {common.default_dtype()} --repeats 3")
