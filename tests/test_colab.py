"""The Colab notebooks in colab/ run top to bottom on CPU exactly as committed, and are committed
without outputs.

Each notebook runs in a fresh Jupyter kernel of this test's own Python (so it imports the mla-jax
under test), in an empty working directory, with the environment a user would have: conftest's
fake-device and platform variables removed, so the notebook's own CPU setup is what runs. A cell
that raises fails its test with nbclient's CellExecutionError, which quotes the cell's source and
its traceback.

The structural tests below check what the notebooks say against the code: the first code cell
imports every dependency and names a broken one with its pip command, no cell speaks of an
existing feature in the future tense, and the prose on attn_impl="auto", generate's decode path,
the bench suites and notebook 03's choice of model per runtime quotes what mla_jax does.
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


@pytest.mark.parametrize("path", [  # the quickstart runs by default, the others with -m slow
    pytest.param(p, marks=() if p.stem.startswith("01_") else pytest.mark.slow) for p in NOTEBOOKS],
    ids=[p.stem for p in NOTEBOOKS])
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


# What every notebook imports in its first code cell, before any cell uses it.
DEPENDENCIES = ("jax", "flax", "optax", "orbax.checkpoint", "mla_jax")
# Future tense for something that already exists ("when `mla-jax bench memory` lands, ...").
FUTURE = re.compile(r"\b(when|once|until)\b[^.\n]*\blands?\b|\bwill land\b|\bnot yet\b",
                    re.IGNORECASE)


def _first_code_cell(path):
  return next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_first_code_cell_imports_each_dependency_before_using_jax(path):
  """A loop `for name in (...): importlib.import_module(name)` over at least DEPENDENCIES, at the
  top level of the first code cell and before its `import jax`."""
  import ast

  tree = ast.parse(_first_code_cell(path).source)
  loops = [(i, node) for i, node in enumerate(tree.body) if isinstance(node, ast.For)
           and isinstance(node.iter, ast.Tuple)
           and "import_module" in ast.unparse(node.body[0])]
  assert len(loops) == 1, f"{path.name}: no import-check loop in the first code cell"
  index, loop = loops[0]
  names = {elt.value for elt in loop.iter.elts}
  assert set(DEPENDENCIES) <= names, f"{path.name} does not check {set(DEPENDENCIES) - names}"
  import_jax = next(i for i, node in enumerate(tree.body) if isinstance(node, ast.Import)
                    and [a.name for a in node.names] == ["jax"])
  assert index < import_jax


def test_first_code_cell_names_a_broken_dependency_and_the_pip_command(tmp_path):
  """With optax unimportable, each notebook's first cell stops with an ImportError that names
  optax (and nothing that does import) and quotes the pip install line the cell itself uses."""
  import subprocess

  script = tmp_path / "run_first_cells.py"
  script.write_text(
      "import json, sys\n"
      "import nbformat\n"
      "sys.modules['optax'] = None  # `import optax` now raises ImportError\n"
      "messages = {}\n"
      "for path in sys.argv[1:]:\n"
      "  cell = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == 'code')\n"
      "  try:\n"
      "    exec(cell.source, {})\n"
      "    messages[path] = None\n"
      "  except ImportError as error:\n"
      "    messages[path] = str(error)\n"
      "print(json.dumps(messages))\n")
  result = subprocess.run([sys.executable, str(script), *map(str, NOTEBOOKS)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  messages = json.loads(result.stdout.splitlines()[-1])
  for path in NOTEBOOKS:
    message = messages[str(path)]
    assert message is not None, f"{path.name}: the first cell ran on without optax"
    assert "  optax: " in message
    assert not any(f"  {name}: " in message for name in DEPENDENCIES if name != "optax")
    source = _first_code_cell(path).source
    url = re.search(r'^MLA_JAX_SOURCE = "(.+)"$', source, re.MULTILINE).group(1)
    assert f"!{sys.executable} -m pip install {url}" in message
    assert "restart" in message.lower()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_no_cell_speaks_of_what_exists_as_future(path):
  for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
    match = FUTURE.search(cell.source)
    assert match is None, f"{path.name} cell {index}: {match.group(0)!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_text_on_attn_impl_auto_names_what_resolve_attn_impl_picks(path):
  """Prose about attn_impl "auto" names both paths it resolves to (without a cache, with one)."""
  from mla_jax.layers.masking import resolve_attn_impl

  picks = {resolve_attn_impl("auto", 1, False), resolve_attn_impl("auto", 1, True),
           resolve_attn_impl("auto", 12, True)}
  for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
    if cell.cell_type == "markdown" and '"auto"' in cell.source:
      for impl in picks:
        assert re.search(rf"\b{impl}\b", cell.source), f"{path.name} cell {index} omits {impl}"


def test_quickstart_names_the_path_generate_decodes_on():
  from mla_jax.sampling import DECODE_ATTN_IMPL

  cells = nbformat.read(COLAB / "01_quickstart.ipynb", as_version=4).cells
  generate = next(c for c in cells if c.source.startswith("## Generate"))
  assert f"decode steps\non the *{DECODE_ATTN_IMPL}* path" in generate.source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_bench_suites_the_notebooks_name_exist(path):
  from mla_jax.bench import SUITES

  text = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells)
  for suite in re.findall(r"mla-jax bench (\w+)", text):
    assert suite in SUITES, f"{path.name} names `mla-jax bench {suite}`, which does not exist"


def test_checkpoints_notebook_says_which_runtime_gets_which_model():
  """03's first cell names each runtime, and the thresholds it quotes are the code's."""
  cells = nbformat.read(COLAB / "03_deepseek_checkpoints.ipynb", as_version=4).cells
  intro = cells[0].source
  code = "\n".join(c.source for c in cells if c.cell_type == "code")
  assert "**CPU runtime: always the reduced model.**" in intro
  assert 'if PLATFORM != "cpu":\n  stats = ' in code  # only GPU/TPU read accelerator memory
  assert "**GPU or TPU runtime: the real model" in intro
  param_gib = float(re.search(r"^PARAM_GIB = ([0-9.]+)$", code, re.MULTILINE).group(1))
  device, host, disk = re.search(
      r"^enough = device_gib >= ([0-9.]+) \* PARAM_GIB and host_gib >= ([0-9.]+) \* PARAM_GIB "
      r"and disk_gib >= ([0-9]+)$", code, re.MULTILINE).groups()
  assert f"{float(device) * param_gib:.1f} GiB ({device} x its {param_gib} GiB" in intro
  assert f"{float(host) * param_gib:.1f} GiB of memory ({host} x {param_gib})" in intro
  assert f"{disk} GiB of disk" in intro
  assert "hub\n  answers" in intro and "if enough and hub_reachable(MODEL_ID):" in code
