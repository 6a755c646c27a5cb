"""The docs pages tell the truth: every `python` block of a page runs (in order, one namespace
per page, public names only; a workdir a block reads is one the test trains, python_stand_ins),
every `bash` block is named in BASH_BLOCKS with the test that runs it, and every relative link
resolves. The README's blocks are tests/test_readme.py's.

Blocks that train for minutes or need a download run with `-m slow`, as written except where the
test says what it changes and why."""

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))
MLA_JAX = str(Path(sys.executable).parent / "mla-jax")


def fenced_blocks(path, language):
  """Contents of the fenced blocks tagged `language` ("" for untagged) in `path`, in order."""
  blocks, current, tag = [], None, None
  for line in Path(path).read_text().splitlines(keepends=True):
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


# Every bash block of each page, in order, and the test that runs it.
BASH_BLOCKS = {
    "architecture.md": {},
    "checkpoints.md": {"deepseek": "test_deepseek_block_as_written (slow, needs torch)"},
    "conversion.md": {"recipe": "test_conversion_recipe_as_written (slow)"},
    "decode.md": {},
    "flash-attention.md": {},
    "generation.md": {"generate": "test_quick_start_and_generate_as_written (slow, test_readme)"},
    "installation.md": {},
    "layer.md": {},
    "moe.md": {},
    "mtp.md": {"train": "test_mtp_blocks_as_written (slow)",
               "generate": "test_mtp_blocks_as_written (slow)",
               "bench": "test_mtp_blocks_as_written (slow)"},
    "nnx.md": {},
    "quantized-cache.md": {},
    "results.md": {},
    "serving.md": {"serve": "test_serve_and_curl_blocks_as_written",
                   "curl": "test_serve_and_curl_blocks_as_written"},
    "sharding.md": {"pod": "test_pod_command_as_written (slow)"},
    "testing.md": {},
    "training.md": {"training examples": "test_training_examples_run (slow)",
                    "print config": "test_print_config_block_as_written"},
}


def bash(page, name):
  """The bash block of docs/`page` that BASH_BLOCKS names `name`."""
  return fenced_blocks(DOCS / page, "bash")[list(BASH_BLOCKS[page]).index(name)]


def test_every_bash_block_has_a_test():
  assert sorted(BASH_BLOCKS) == PAGES
  from tests import test_readme

  names = {n for n in globals() if n.startswith("test_")} | {
      n for n in vars(test_readme) if n.startswith("test_")}
  for page, registry in BASH_BLOCKS.items():
    assert len(fenced_blocks(DOCS / page, "bash")) == len(registry), page
    for runner in registry.values():
      assert runner.split()[0] in names, (page, runner)
  from mla_jax.config import load_config

  default_workdir = load_config(None).workdir  # where the quick start's run lives
  assert bash("generation.md", "generate").startswith(
      f"mla-jax generate --checkpoint {default_workdir} ")
  assert bash("checkpoints.md", "deepseek").startswith(
      "mla-jax convert --from-hf ~/models/DeepSeek-V2-Lite")
  assert "--distributed" in bash("sharding.md", "pod")


PUBLIC_MODULES = {"mla_jax": None, "mla_jax.sharding": {"make_mesh", "shard", "sharded_cached_apply"},
                  "mla_jax.nnx": None, "mla_jax.serving": None}


def public_names_only(source, where):
  """A python block may use mla_jax.<name of __all__>, mla_jax.nnx.<name of its __all__> and
  mla_jax.sharding's three functions, so that moving private modules never breaks the docs."""
  import mla_jax

  import mla_jax.nnx

  import mla_jax.serving

  allowed = {"mla_jax": set(mla_jax.__all__) | {"sharding", "nnx", "serving"},
             "mla_jax.nnx": set(mla_jax.nnx.__all__),
             "mla_jax.serving": set(mla_jax.serving.__all__), **{
                 m: names for m, names in PUBLIC_MODULES.items() if names}}
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("mla_jax"):
          assert alias.name in PUBLIC_MODULES, (where, alias.name)
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mla_jax"):
      assert node.module in allowed, (where, node.module)
      for alias in node.names:
        assert alias.name in allowed[node.module], (where, node.module, alias.name)
    elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (
        node.value.id == "mla_jax"):
      assert node.attr in allowed["mla_jax"], (where, node.attr)
    elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and (
        isinstance(node.value.value, ast.Name) and node.value.value.id == "mla_jax"):
      assert node.attr in allowed.get(f"mla_jax.{node.value.attr}", ()), (where, node.attr)


# What each page's python blocks leave behind, checked after they ran.
PYTHON_CHECKS = {
    "layer.md": lambda ns: ns["h"].shape == (2, 10, 64) and ns["cache"].lengths.tolist() == [6, 6],
    "generation.md": lambda ns: ns["lengths"].tolist() == [11, 9] and ns["run"].step == 2 and (
        ns["text"].startswith("class Stack:") and ns["out"].shape == (1, 12 + 40)),
    "decode.md": lambda ns: ns["with_halves"].shape == (1, 1, ns["cfg"].vocab_size),
    "flash-attention.md": lambda ns: ns["out"].shape == (1, 1024, 4, 32),
    "quantized-cache.md": lambda ns: ns["cache"].layers[0].quantized,
    "moe.md": lambda ns: set(ns["logits"]) == {"dispatch", "dense"},
    "sharding.md": lambda ns: ns["logits"].shape == (2, 1, ns["cfg"].vocab_size) and (
        ns["yours"].shape == ns["X"].shape),
    "serving.md": lambda ns: len(ns["completions"]) == 3 and len(ns["sampled"]) == 6 and (
        ns["engine"].stats["pages_free"] == 32),
    "nnx.md": lambda ns: ns["out"].shape == (2, 3 + 8) and ns["losses"][-1] < ns["losses"][0],
    "conversion.md": lambda ns: ns["text"].startswith("def parse(") and len(ns["theirs"]) > 4,
    "mtp.md": lambda ns: ns["drafted"].shape == (2, 3 + 10) and ns["stats"].reached.shape == (2,),
}
SLOW_PYTHON_PAGES = {"conversion.md"}  # its block reads the recipe's workdirs: made by a slow fixture


def test_every_page_with_python_has_a_check():
  assert {p for p in PAGES if fenced_blocks(DOCS / p, "python")} == set(PYTHON_CHECKS)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A 2-step `mla-jax train` of tests.helpers' small model on the library's sources: stands in
  for the quick start's 1000-step workdir (minutes to train) that generation.md loads."""
  from mla_jax.cli import main
  from tests.helpers import DATA, SMALL_MODEL

  workdir = tmp_path_factory.mktemp("run") / "tiny"
  assert main(["train", f"data.path={DATA}", *SMALL_MODEL, "train.steps=2", "train.batch_size=8",
               "train.seq_len=32", "train.eval_every=2", "train.eval_batches=1",
               "train.sample_tokens=0", f"workdir={workdir}"]) == 0
  return str(workdir)


def python_stand_ins():
  """page -> {text in its python blocks: the fixture whose value replaces it}: a workdir a block
  reads, made by the test (the blocks run as written otherwise)."""
  from mla_jax.config import load_config

  return {"generation.md": {load_config(None).workdir: "trained_workdir"},
          "conversion.md": {"runs/convert-gqa-mla-ft": "recipe_fine_tuned",
                            "runs/convert-gqa-hf": "recipe_export"}}


RECIPE_STEPS = " train.steps=4 train.eval_every=2 train.eval_batches=1 train.checkpoint_every=4"


@pytest.fixture(scope="module")
def conversion_recipe(tmp_path_factory):
  """conversion.md's recipe block, each line as written in a directory of its own, the two
  trainings shortened to 4 steps (RECIPE_STEPS appended; as written they take an hour here) and
  the calibration to 8 windows: the source, its conversion, the fine-tune and the export."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  cwd = tmp_path_factory.mktemp("recipe")
  for line in bash("conversion.md", "recipe").strip().splitlines():
    command = line + (RECIPE_STEPS if " train" in line else "")
    command = command.replace("--calibration stdlib", "--calibration stdlib "
                              "--calibration-samples 8")
    result = subprocess.run(["bash", "-c", command.replace("mla-jax", shlex.quote(MLA_JAX), 1)],
                            cwd=cwd, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, (command, result.stderr)
  return cwd


@pytest.fixture
def recipe_fine_tuned(conversion_recipe):
  return str(conversion_recipe / "runs" / "convert-gqa-mla-ft")


@pytest.fixture
def recipe_export(conversion_recipe):
  return str(conversion_recipe / "runs" / "convert-gqa-hf")


@pytest.mark.slow
def test_conversion_recipe_as_written(conversion_recipe):
  """What the recipe's lines leave: an 80% smaller cache, a fine-tune that started from the
  conversion (evaluated at step 0) and an export transformers' config reads as DeepseekV3."""
  import json

  report = json.loads((conversion_recipe / "runs" / "convert-gqa-mla" / "conversion.json")
                      .read_text())
  assert report["cache_elements_per_token_per_layer"] == {"source": 160, "target": 32}
  metrics = (conversion_recipe / "runs" / "convert-gqa-mla-ft" / "metrics.jsonl").read_text()
  assert '"step": 0, "val_loss"' in metrics
  config = json.loads((conversion_recipe / "runs" / "convert-gqa-hf" / "config.json").read_text())
  assert config["model_type"] == "deepseek_v3" and config["kv_lora_rank"] == 16


@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.slow)
                                  if p in SLOW_PYTHON_PAGES else p for p in sorted(PYTHON_CHECKS)])
def test_python_blocks_run(page, request):
  namespace = {}
  stand_ins = python_stand_ins().get(page, {})
  for i, block in enumerate(fenced_blocks(DOCS / page, "python")):  # later blocks reuse names
    public_names_only(block, f"docs/{page}, python block {i + 1}")
    for text, fixture in stand_ins.items():
      block = block.replace(text, request.getfixturevalue(fixture))
    exec(compile(block, f"docs/{page}", "exec"), namespace)
  assert PYTHON_CHECKS[page](namespace)


def test_public_names_check_refuses_private_modules():
  with pytest.raises(AssertionError):
    public_names_only("from mla_jax.layers.mla import MultiHeadLatentAttention", "here")
  with pytest.raises(AssertionError):
    public_names_only("import mla_jax\nmla_jax.cache.init_cache", "here")
  with pytest.raises(AssertionError):
    public_names_only("from mla_jax.sharding import tree_shardings", "here")
  public_names_only("import mla_jax\nfrom mla_jax.sharding import shard\nmla_jax.Transformer",
                    "here")


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", ["README.md"] + [f"docs/{p}" for p in PAGES])
def test_relative_links_resolve(page):
  path = ROOT / page
  for target in LINK.findall(path.read_text()):
    if target.startswith(("http://", "https://", "#")):
      continue
    assert (path.parent / target.split("#")[0]).exists(), (page, target)


def test_readme_links_every_page_and_notebook():
  links = set(LINK.findall((ROOT / "README.md").read_text()))
  for page in PAGES:
    assert f"docs/{page}" in links, page
  for notebook in sorted((ROOT / "colab").glob("*.ipynb")):
    assert f"colab/{notebook.name}" in links, notebook.name


def test_no_tracker_numbers_or_hashes_in_docs():
  """Facts in the docs come with their command, not with a tracker number or commit hash (the
  run ids of the quick start's and of configs/tiny_mtp.yaml's workdirs, hashes of their configs,
  are the hex words allowed)."""
  from mla_jax.config import load_config

  run_ids = [load_config(None).workdir.rsplit("-", 1)[1],
             load_config(str(ROOT / "configs" / "tiny_mtp.yaml")).with_default_workdir(
                 "tiny_mtp").workdir.rsplit("-", 1)[1]]
  for page in ["README.md"] + [f"docs/{p}" for p in PAGES]:
    text = (ROOT / page).read_text().replace(run_ids[0], "").replace(run_ids[1], "")
    assert not re.search(r"[Ii]ssue [0-9]+", text), page
    assert not re.search(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", text), page


@pytest.mark.slow
def test_training_examples_run(tmp_path):
  """Each line of training.md's block, as written plus `train.steps=4 train.eval_every=2
  train.sample_tokens=0` (as written they train for minutes each); ~ is a HOME made here."""
  corpus = tmp_path / "home" / "corpus"
  corpus.mkdir(parents=True)
  for name in ("a", "b", "c"):
    (corpus / f"{name}.txt").write_text((ROOT / "README.md").read_text())
  env = {**os.environ, "HOME": str(tmp_path / "home")}
  for line in bash("training.md", "training examples").strip().splitlines():
    command = line.split("#")[0].strip() + " train.steps=4 train.eval_every=2 train.sample_tokens=0"
    result = subprocess.run(["bash", "-c", command.replace("mla-jax", shlex.quote(MLA_JAX), 1)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (command, result.stderr)
    assert "final: step 4" in result.stdout, command
  assert (tmp_path / "runs" / "long" / "checkpoints" / "4").is_dir()


@pytest.mark.slow
def test_mtp_blocks_as_written(tmp_path):
  """mtp.md's lines: the training line with `train.steps=4 ...` on the library's own sources
  into a workdir made here (as written it trains for many minutes); the generate line on that
  workdir in place of the one the training line writes (checked to be that one) and fewer new
  tokens; bench spec on it with --quick (as written: minutes of timed runs)."""
  from mla_jax.config import load_config
  from tests.helpers import DATA

  run = lambda line, *extra: subprocess.run(  # noqa: E731
      shlex.split(line.replace("mla-jax", MLA_JAX, 1)) + list(extra), cwd=ROOT,
      capture_output=True, text=True, timeout=1800)
  workdir = tmp_path / "tiny_mtp"
  trained = run(bash("mtp.md", "train").strip(), f"workdir={workdir}", f"data.path={DATA}",
                "train.steps=4", "train.eval_every=2", "train.sample_tokens=0",
                "train.batch_size=8")
  assert trained.returncode == 0 and "final: step 4" in trained.stdout, trained.stderr
  line = bash("mtp.md", "generate").strip()
  default = load_config(str(ROOT / "configs" / "tiny_mtp.yaml")).with_default_workdir(
      "tiny_mtp").workdir
  assert f"--checkpoint {default} " in line
  generated = run(line.replace(default, str(workdir)).replace("80", "20"))
  assert generated.returncode == 0, generated.stderr
  assert generated.stdout.startswith("def __init__(self, name):") and "---" in generated.stdout
  assert "speculative: 2 drafts per verify step" in generated.stderr
  bench = run(bash("mtp.md", "bench").strip(), "--quick", "--checkpoint", str(workdir), "--out",
              str(tmp_path / "bench"))
  assert bench.returncode == 0, bench.stderr
  assert (tmp_path / "bench" / "spec.md").is_file()


def test_serve_and_curl_blocks_as_written(trained_workdir):
  """serving.md's `mla-jax serve` line on the test's trained workdir (for the quick start's) at
  --port 0 (for 8000, which may be taken), then its curl block verbatim against that port: each
  curl gets its answer; SIGTERM then stops the server with status 0. (The block's pip line is
  what the test extra already installed.)"""
  import json
  import signal

  from mla_jax.config import load_config

  install, command = bash("serving.md", "serve").strip().splitlines()
  assert install == 'pip install -e ".[serve]"'
  command = command.replace(load_config(None).workdir, trained_workdir).replace(
      "--port 8000", "--port 0")
  server = subprocess.Popen(shlex.split(command.replace("mla-jax", MLA_JAX, 1)), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    for line in server.stdout:
      found = re.search(r"on http://127\.0\.0\.1:([0-9]+) ", line)
      if found:
        break
    else:
      raise AssertionError("mla-jax serve ended before serving")
    port = found.group(1)
    outputs = []
    for call in bash("serving.md", "curl").replace("\\\n", " ").strip().splitlines():
      call = call.replace("localhost:8000", f"127.0.0.1:{port}")
      result = subprocess.run(["bash", "-c", call], capture_output=True, text=True, timeout=120)
      assert result.returncode == 0, (call, result.stderr)
      outputs.append(result.stdout)
    first, streamed, ids, models, health = outputs
    assert json.loads(first)["usage"]["completion_tokens"] == 40
    events = [e for e in streamed.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]" and len(events) > 2
    by_ids = json.loads(ids)  # sampled at temperature 1 with a fresh seed: EOS may end it early
    usage, finish = by_ids["usage"], by_ids["choices"][0]["finish_reason"]
    assert usage["prompt_tokens"] == 3 and 1 <= usage["completion_tokens"] <= 5
    assert usage["total_tokens"] == 3 + usage["completion_tokens"]
    assert finish == "stop" or (finish == "length" and usage["completion_tokens"] == 5)
    assert json.loads(models)["data"][0]["id"] == trained_workdir
    assert json.loads(health) == {"status": "ok"}
  finally:
    server.send_signal(signal.SIGTERM)
    server.stdout.read()
    assert server.wait(timeout=120) == 0


def test_print_config_block_as_written(tmp_path):
  """training.md's --print-config line verbatim: run.yaml is the resolved config, nothing else
  is written (no runs/)."""
  from mla_jax.config import load_config

  command = bash("training.md", "print config").strip()
  result = subprocess.run(["bash", "-c", command.replace("mla-jax", shlex.quote(MLA_JAX), 1)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and result.stderr == "", (command, result.stderr)
  assert load_config(tmp_path / "run.yaml") == load_config("tiny_mqa", "train.steps=50")
  assert [p.name for p in tmp_path.iterdir()] == ["run.yaml"]


@pytest.mark.slow
def test_deepseek_block_as_written(tmp_path):
  """Both lines of checkpoints.md's block verbatim, with ~/models/DeepSeek-V2-Lite a tiny random
  DeepseekV2 saved by transformers (the real one is a 30 GB download) with a word-level
  tokenizer."""
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from tokenizers import Tokenizer, models, pre_tokenizers

  home = tmp_path / "home"
  model_dir = home / "models" / "DeepSeek-V2-Lite"
  words = ["<eos>", "<unk>", "The", "capital", "of", "France", "is", "Paris", "."]
  config = transformers.DeepseekV2Config(
      vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=16,
      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=2,
      num_experts_per_tok=1, n_shared_experts=1, moe_intermediate_size=16,
      first_k_dense_replace=1, topk_method="greedy", max_position_embeddings=256,
      eos_token_id=0, tie_word_embeddings=False, torch_dtype="bfloat16")
  transformers.DeepseekV2ForCausalLM(config).save_pretrained(model_dir)
  tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.save(str(model_dir / "tokenizer.json"))
  env = {**os.environ, "HOME": str(home)}
  command = bash("checkpoints.md", "deepseek").replace("mla-jax", shlex.quote(MLA_JAX))
  result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("wrote runs/v2-lite")
  assert "The capital of France is" in result.stdout


@pytest.mark.slow
def test_pod_command_as_written(tmp_path):
  """sharding.md's multi-host command under a simulated one-process SLURM job (JAX finds its
  coordinator from SLURM's variables, as it would on a cluster), with workdir=/mnt/shared/run
  replaced by a directory here and train.steps=2 train.batch_size=8 train.seq_len=64
  train.eval_batches=1 train.sample_tokens=0 train.warmup_steps=null appended (as written it
  trains small.yaml for 20,000 steps, on accelerators)."""
  command = bash("sharding.md", "pod").strip().replace("/mnt/shared/run", str(tmp_path / "run"))
  command = command.replace("mla-jax", shlex.quote(MLA_JAX), 1) + (
      " train.steps=2 train.batch_size=8 train.seq_len=64 train.eval_batches=1"
      " train.sample_tokens=0 train.warmup_steps=null")
  env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost",
         "SLURM_NODELIST": "localhost", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "1", "SLURM_JOB_NUM_NODES": "1"}
  result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1800)
  assert result.returncode == 0, result.stderr
  assert "mesh data=1 x fsdp=2 x tensor=4 x sequence=1" in result.stdout
  assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
