"""The README tells the truth: every `python` and `bash` block runs in a test, its quick-start
output is what the CLI prints, and CI runs exactly its test command. The docs pages' blocks are
tests/test_docs.py's.

Which test runs each bash block is listed in BASH_BLOCKS; a block added without a test fails
test_every_bash_block_has_a_test. Blocks that train for minutes run with `-m slow`."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_docs import fenced_blocks, public_names_only
from tests.test_docs import bash as docs_bash

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MLA_JAX = str(Path(sys.executable).parent / "mla-jax")


def _blocks(language):
  """Contents of the README's fenced blocks tagged `language` ("" for untagged), in order."""
  return fenced_blocks(ROOT / "README.md", language)


def _bash(name):
  """The bash block that BASH_BLOCKS names `name`."""
  return _blocks("bash")[list(BASH_BLOCKS).index(name)]


# Every bash block of the README, in order, and the test that runs it.
BASH_BLOCKS = {
    "quick start": "test_quick_start_and_generate_as_written (slow)",
    "test command": "test_ci_runs_the_readme_test_command: .ci/run runs it verbatim",
}


def test_every_bash_block_has_a_test():
  assert len(_blocks("bash")) == len(BASH_BLOCKS)
  assert _bash("quick start").strip() == "pip install -e . && mla-jax train"
  names = {name for name in globals() if name.startswith("test_")}
  for runner in BASH_BLOCKS.values():
    assert runner.split()[0].rstrip(":") in names, runner


def test_python_examples_run():
  namespace = {}
  for i, block in enumerate(_blocks("python")):  # later blocks reuse names, as a reader would
    public_names_only(block, f"README.md, python block {i + 1}")
    exec(compile(block, "README.md", "exec"), namespace)
  assert namespace["step"].shape == (2, 1, 64)
  assert namespace["y"].shape == (2, 10, 64)


def test_quick_start_output_is_what_info_prints():
  shown = next(b for b in _blocks("") if b.startswith("config: configs/tiny.yaml"))
  result = subprocess.run([MLA_JAX, "info", "configs/tiny.yaml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=True)
  assert result.stdout == shown


def test_ci_runs_the_readme_test_command():
  test_command = _bash("test command").strip()
  assert test_command == 'pip install -e ".[test]" && python -m pytest'
  ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
  assert test_command in ci_lines


def test_parity_tests_say_why_they_are_skipped_and_how_to_run_them(tmp_path):
  """Without PyTorch the README's test command lists the parity tests as skipped, with the
  install command that docs/testing.md gives."""
  hidden = tmp_path / "torch"
  hidden.mkdir()
  (hidden / "__init__.py").write_text(  # what a Python without torch raises
      "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
  result = subprocess.run([sys.executable, "-m", "pytest", "tests/test_hf.py", "-q", "-p",
                           "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 5, result.stdout + result.stderr  # 5: this file alone ran nothing
  install = re.search(r"PARITY_INSTALL = \('(.*)'\s*'(.*)'\)",
                      (ROOT / "tests" / "hf_parity.py").read_text())
  command = install.group(1) + install.group(2)
  assert command in (ROOT / "docs" / "testing.md").read_text().replace("\n", " ")
  assert "docs/testing.md" in README
  assert f"SKIPPED [1] tests/test_hf.py:" in result.stdout
  assert f"Hugging Face parity tests need PyTorch: {command}" in result.stdout
  assert "1 skipped" in result.stdout


def _shown_quick_start():
  return next(b for b in _blocks("") if b.startswith("workdir: runs/tiny-"))


@pytest.mark.slow
def test_quick_start_and_generate_as_written(tmp_path):
  """The quick start's `mla-jax train` (its `pip install -e .` is what CI's install did) in a
  fresh directory, then docs/generation.md's generate block verbatim: the losses and the sample
  are the README's, the generated text docs/generation.md's, to the last digit; timings and
  memory figures may differ."""
  train = _bash("quick start").split("&&")[1].strip()
  result = subprocess.run(shlex.split(train.replace("mla-jax", MLA_JAX, 1)), cwd=tmp_path,
                          capture_output=True, text=True, timeout=3600)
  assert result.returncode == 0, result.stderr
  deterministic = lambda text: [re.sub(r", [\d,]+ tokens/s$", "", line)  # noqa: E731
                                for line in text.splitlines()
                                if not line.startswith(("compiled the", "data: Python stdlib"))]
  printed = deterministic(result.stdout)
  assert set(deterministic(_shown_quick_start())) <= set(printed)
  command = docs_bash("generation.md", "generate").strip().replace("mla-jax", MLA_JAX, 1)
  generated = subprocess.run(shlex.split(command), cwd=tmp_path, capture_output=True, text=True,
                             timeout=600)
  assert generated.returncode == 0, generated.stderr
  shown = next(b for b in fenced_blocks(ROOT / "docs" / "generation.md", "")
               if b.startswith("class Stack:"))
  assert generated.stdout == "".join(l + "\n" for l in shown.splitlines() if not l.startswith(
      ("compile:", "of which", "loaded step")))


def test_readme_is_the_front_door():
  """At most 200 lines: what MLA is, the quick start, the layer, the claims and the links; the
  rest lives in docs/."""
  assert len(README.splitlines()) <= 200
