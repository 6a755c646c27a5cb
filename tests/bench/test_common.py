"""The shared pieces: number formatting, sizes, variant selection, equal-parameter models,
timing arguments, and the reproducible command line."""

import dataclasses
from pathlib import Path

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



def test_time_interleaved_alternates_the_calls_and_validates():
  order = []
  timings = common.time_interleaved({"a": lambda: order.append("a"),
                                     "b": lambda: order.append("b")}, repeats=2)
  assert order == ["a", "b"] * 3  # one untimed round, then the timed ones, in turn
  for timing in timings.values():
    assert timing.min_s <= timing.median_s <= timing.max_s and timing.repeats == 2
  with pytest.raises(ValueError, match="repeats=0"):
    common.time_interleaved({"a": lambda: 1}, repeats=0)

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


def test_quick_runs_write_outside_the_committed_results(tmp_path):
  """--quick defaults to bench_results/quick/, which git ignores; an --out inside the committed
  bench_results/ (other than quick/) is refused with --quick, and allowed without it."""
  import subprocess

  from mla_jax.bench import COMMITTED, output_dir, parse_suite_args

  root = COMMITTED.parent
  quick = output_dir(parse_suite_args("memory", ["--quick"]))
  assert quick == Path("bench_results") / "quick"
  assert output_dir(parse_suite_args("memory", [])) == Path("bench_results")
  in_repo = (root / quick).resolve()
  assert COMMITTED in in_repo.parents and in_repo != COMMITTED
  assert not any(path.is_relative_to(in_repo)
                 for path in [COMMITTED / "memory.md", COMMITTED / "decode_batch8" / "decode.md"])
  ignored = subprocess.run(["git", "check-ignore", "-q", str(quick / "memory.md")], cwd=root)
  assert ignored.returncode == 0  # git status stays clean after a quick run
  for out in (COMMITTED, COMMITTED / "decode_batch8", root / "bench_results" / ".." /
              "bench_results"):
    with pytest.raises(ValueError, match=r"is inside the committed bench_results/, which --quick "
                                         r"must not overwrite"):
      output_dir(parse_suite_args("memory", ["--quick", "--out", str(out)]))
  assert output_dir(parse_suite_args("memory", ["--out", str(COMMITTED)])) == COMMITTED
  for out in (tmp_path, COMMITTED / "quick" / "mine"):
    assert output_dir(parse_suite_args("memory", ["--quick", "--out", str(out)])) == out


def test_a_quick_run_reports_progress_and_writes_under_quick(tmp_path, monkeypatch, capsys):
  """From any directory, `bench memory --quick` writes ./bench_results/quick/ and says on
  stderr what it is doing, each line with the seconds elapsed; stdout holds only the table."""
  import re

  from mla_jax.cli import main

  monkeypatch.chdir(tmp_path)
  assert main(["bench", "memory", "--quick"]) == 0
  assert sorted(p.name for p in (tmp_path / "bench_results" / "quick").iterdir()) == [
      "memory.json", "memory.md", "memory.png"]
  assert sorted(p.name for p in (tmp_path / "bench_results").iterdir()) == ["quick"]
  captured = capsys.readouterr()
  lines = captured.err.splitlines()
  assert [re.sub(r"\[[0-9]+\.[0-9] s\]", "[T]", line) for line in lines] == [
      "mla-jax bench memory [T]: DeepSeek-V2: MLA and its baselines, from deepseek_v2.yaml",
      "mla-jax bench memory [T]: DeepSeek-V2-Lite: MLA and its baselines, from "
      "deepseek_v2_lite.yaml",
      "mla-jax bench memory [T]: DeepSeek-V3: MLA and its baselines, from deepseek_v3.yaml",
      "mla-jax bench memory [T]: done; writing bench_results/quick"]
  assert "mla-jax bench memory [" not in captured.out
  assert "wrote bench_results/quick/memory.md" in captured.out
