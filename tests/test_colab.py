"""The Colab notebooks in colab/ run top to bottom on CPU exactly as committed, and are committed
without outputs.

Each notebook runs in a fresh Jupyter kernel of this test's own Python (so it imports the mla-jax
under test), in an empty working directory, with the environment a user would have: conftest's
fake-device and platform variables removed, so the notebook's own CPU setup is what runs. A cell
that raises fails its test with nbclient's CellExecutionError, which quotes the cell's source and
its traceback.
"""

import json
import os
import re
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

COLAB = Path(__file__).resolve().parents[1] / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
KERNEL = "mla-jax-test-python"
CELL_TIMEOUT_S = 600  # a guard against a hung cell; the notebooks take about a minute each on CPU
# Set by tests/conftest.py for the test process; a user's kernel has neither.
TEST_ONLY_ENV = ("XLA_FLAGS", "JAX_PLATFORMS")
ANSI_COLOURS = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks


def test_colab_folder_holds_the_three_notebooks():
  assert [p.name for p in NOTEBOOKS] == [
      "01_quickstart.ipynb", "02_latent_cache.ipynb", "03_deepseek_checkpoints.ipynb"]


@pytest.fixture
def kernel_spec(tmp_path, monkeypatch):
  """A kernelspec that starts ipykernel on exactly this interpreter, found first on
  JUPYTER_PATH: no `ipykernel install` needed, and no user-wide "python3" spec can redirect the
  notebooks to another Python."""
  spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
          "display_name": "mla-jax tests", "language": "python"}
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  return KERNEL


def _outputs_text(notebook) -> str:
  parts = []
  for cell in notebook.cells:
    for output in cell.get("outputs", []):
      parts.append(output.get("text", ""))
      parts.append(output.get("data", {}).get("text/plain", ""))
  return "\n".join(parts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_on_cpu_as_committed(path, kernel_spec, tmp_path):
  notebook = nbformat.read(path, as_version=4)
  workdir = tmp_path / "cwd"
  workdir.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in TEST_ONLY_ENV}
  client = nbclient.NotebookClient(notebook, kernel_name=kernel_spec, timeout=CELL_TIMEOUT_S,
                                   resources={"metadata": {"path": str(workdir)}})
  try:
    client.execute(env=env)
  except nbclient.exceptions.CellExecutionError as error:  # quotes the cell and its traceback
    pytest.fail(f"{path.name}: {ANSI_COLOURS.sub('', str(error))}", pytrace=False)

  code_cells = [c for c in notebook.cells if c.cell_type == "code"]
  assert all(c.execution_count is not None for c in code_cells)  # every cell ran
  text = _outputs_text(notebook)
  assert "install skipped" in text  # mla_jax came from this environment, not from a pip install
  assert "cpu device(s)" in text
  images = [o for c in code_cells for o in c.outputs if "image/png" in o.get("data", {})]
  if path.name == "01_quickstart.ipynb":
    assert len(images) == 1  # the loss plot, inline
    assert "MLA is 1.41% of MHA" in text  # DeepSeek-V2's 576 of 40,960 elements per token
  elif path.name == "02_latent_cache.ipynb":
    assert len(images) == 2  # memory and decode plots
    assert "8 cpu device(s)" in text  # the notebook's own virtual devices, not conftest's
  elif path.name == "03_deepseek_checkpoints.ipynb":
    assert "using a tiny random DeepSeek-V2 instead of deepseek-ai/DeepSeek-V2-Lite" in text
    assert "on each of the 8 device(s)" in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  for index, cell in enumerate(notebook.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [], f"{path.name} cell {index} has outputs: strip them"
      assert cell.execution_count is None, f"{path.name} cell {index} has an execution count"
    assert "execution" not in cell.metadata, f"{path.name} cell {index} has execution timings"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_opens_with_colab_link_and_install_cell(path):
  notebook = nbformat.read(path, as_version=4)
  first = notebook.cells[0]
  assert first.cell_type == "markdown"
  assert "colab.research.google.com/github/" in first.source and path.name in first.source
  assert "MLA_JAX_SOURCE" in first.source  # the one line a fork edits is named up front
  install = next(c for c in notebook.cells if c.cell_type == "code")
  assert install.source.splitlines()[1].startswith("MLA_JAX_SOURCE = ")
  assert 'find_spec("mla_jax") is None' in install.source  # skipped where mla_jax imports
  assert "jax.default_backend()" in install.source  # sizes follow the detected platform
