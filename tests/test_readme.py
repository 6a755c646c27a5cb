"""The README tells the truth: its code runs, its quick-start output is what the CLI prints, and
CI runs exactly its test command."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language):
  """Contents of the README's fenced blocks tagged `language` ("" for untagged), in order."""
  blocks, current, tag = [], None, None
  for line in README.splitlines(keepends=True):
    if line.startswith("```"):
      if current is None:
        current, tag = [], line[3:].strip()
      else:
        if tag == language:
          blocks.append("".join(current))
        current = None
    elif current is not None:
      current.append(line)
  return blocks


def test_python_examples_run():
  namespace = {}
  for block in _blocks("python"):  # later blocks reuse names from earlier ones, as a reader would
    exec(compile(block, "README.md", "exec"), namespace)
  assert namespace["logits"].shape == (2, 1, namespace["cfg"].vocab_size)
  assert namespace["cache"].lengths.tolist() == [6, 6]
  assert namespace["tokens"].shape == (2, 3 + 8) and namespace["lengths"].tolist() == [11, 9]


def test_quick_start_output_is_what_info_prints():
  commands = [b.strip() for b in _blocks("bash")]
  assert commands[0] == "pip install -e . && mla-jax train"
  shown = next(b for b in _blocks("") if b.startswith("config: configs/tiny.yaml"))
  script = Path(sys.executable).parent / "mla-jax"
  result = subprocess.run([str(script), "info", "configs/tiny.yaml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=True)
  assert result.stdout == shown


def test_ci_runs_the_readme_test_command():
  test_command = [b.strip() for b in _blocks("bash")][1]
  assert test_command == 'pip install -e ".[test]" && python -m pytest'
  ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
  assert test_command in ci_lines
