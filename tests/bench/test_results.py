"""The README's Results are the committed bench_results/ files, commands included."""

from pathlib import Path

import pytest

from mla_jax.bench import SUITES

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("suite", list(SUITES))
def test_readme_shows_each_suite_with_its_command(suite):
  readme = (ROOT / "README.md").read_text()
  table = (ROOT / "bench_results" / f"{suite}.md").read_text()
  assert (ROOT / "bench_results" / f"{suite}.json").is_file()
  assert (ROOT / "bench_results" / f"{suite}.png").is_file()
  command = next(line for line in table.splitlines() if line.startswith("- command: "))
  assert command in readme
  rows = [line for line in table.splitlines() if line.startswith("| ")]
  assert rows and all(row in readme for row in rows)
