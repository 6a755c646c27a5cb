"""The results are the committed bench_results/ files: docs/results.md quotes each suite's
command and links its files, and every figure of the README's claims table is in the committed
file its row links. No test asserts that a table is copied into prose: pages quote, files hold
the tables."""

import re
from pathlib import Path

import pytest

from mla_jax.bench import SUITES

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results.md"
# Every committed run: a suite's default --out, and second decode and train runs written
# elsewhere.
RUNS = [f"{suite}" for suite in SUITES] + ["decode_batch8/decode", "train_mtp/train",
                                           "train_batch16/train"]


def _command(table):
  return next(line for line in table.splitlines() if line.startswith("- command: "))


@pytest.mark.parametrize("run", RUNS)
def test_results_page_quotes_each_run_and_links_its_files(run):
  page = RESULTS.read_text()
  table = (ROOT / "bench_results" / f"{run}.md").read_text()
  assert (ROOT / "bench_results" / f"{run}.json").is_file()
  assert (ROOT / "bench_results" / f"{run}.png").is_file()
  assert _command(table) in page.splitlines()  # the committed command, verbatim
  for ext in ("md", "png"):
    assert f"(../bench_results/{run}.{ext})" in page, (run, ext)
  machine = next(line for line in table.splitlines() if line.startswith("- machine: "))
  assert machine.removeprefix("- machine: ") in page  # the machine, named as the file names it


def _claims_rows():
  readme = (ROOT / "README.md").read_text()
  section = readme.split("## The claims", 1)[1].split("\n## ", 1)[0]
  assert "(docs/results.md)" in section
  rows = [line for line in section.splitlines() if line.startswith("| ")][2:]  # past the header
  assert len(rows) >= len(SUITES)
  return rows


LINK = re.compile(r"\[([^\]]*)\]\(([^)]*)\)")
NUMBER = re.compile(r"(?<![\w.,-])\d[\d,]*(?:\.\d+)?")


def test_claims_table_cites_only_committed_figures():
  """Each row's "here" cell links the bench_results file(s) it comes from, and every number in
  it occurs in one of them (each number as the file writes it, e.g. 8,192 or 35.9)."""
  cited = set()
  for row in _claims_rows():
    here = [cell.strip() for cell in row.strip("|").split("|")][2]
    files = [target for _, target in LINK.findall(here)]
    assert files and all(f.startswith("bench_results/") for f in files), row
    texts = [(ROOT / f).read_text() for f in files]
    figures = NUMBER.findall(LINK.sub(r"\1", here))
    assert figures, row
    for figure in figures:
      assert any(re.search(rf"(?<![\d.,]){re.escape(figure)}(?![\d,]|\.\d)", t) for t in texts), (
          figure, files)
    cited.update(Path(f).stem for f in files)
  assert cited == set(SUITES)  # every suite has its claim
