"""The README tells the truth: every `python` and `bash` block runs in a test, its quick-start
output is what the CLI prints, and CI runs exactly its test command.

Which test runs each bash block is listed in BASH_BLOCKS; a block added without a test fails
test_every_bash_block_has_a_test. Blocks that train for minutes or need a download run with
`-m slow`, as written except where the test says what it changes and why."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MLA_JAX = str(Path(sys.executable).parent / "mla-jax")


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


def _bash(name):
  """The bash block that BASH_BLOCKS names `name`."""
  return _blocks("bash")[list(BASH_BLOCKS).index(name)]


# Every bash block of the README, in order, and the test that runs it.
BASH_BLOCKS = {
    "quick start": "test_quick_start_and_generate_as_written (slow)",
    "test command": "test_ci_runs_the_readme_test_command: .ci/run runs it verbatim",
    "training examples": "test_training_examples_run (slow)",
    "generate": "test_quick_start_and_generate_as_written (slow)",
    "deepseek": "test_deepseek_block_as_written (slow, needs torch)",
    "pod": "test_pod_command_as_written (slow)",
}


def test_every_bash_block_has_a_test():
  assert len(_blocks("bash")) == len(BASH_BLOCKS)
  assert _bash("quick start").strip() == "pip install -e . && mla-jax train"
  from mla_jax.config import load_config

  default_workdir = load_config(None).workdir  # where the quick start's run lives
  assert _bash("generate").startswith(f"mla-jax generate --checkpoint {default_workdir} ")
  assert _bash("deepseek").startswith("mla-jax convert --from-hf ~/models/DeepSeek-V2-Lite")
  assert "--distributed" in _bash("pod")
  names = {name for name in globals() if name.startswith("test_")}
  for runner in BASH_BLOCKS.values():
    assert runner.split()[0].rstrip(":") in names, runner


def test_python_examples_run():
  namespace = {}
  for block in _blocks("python"):  # later blocks reuse names from earlier ones, as a reader would
    exec(compile(block, "README.md", "exec"), namespace)
  assert namespace["h"].shape == (2, 10, 64)  # the NNX bridge
  assert namespace["logits"].shape == (2, 1, namespace["cfg"].vocab_size)
  assert namespace["cache"].lengths.tolist() == [6, 6]
  assert namespace["tokens"].shape == (2, 3 + 8) and namespace["lengths"].tolist() == [11, 9]


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
  """Issue 9, item 7: without PyTorch the README's test command lists the parity tests as
  skipped, with the install command the README gives."""
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
                      (ROOT / "tests" / "test_hf.py").read_text())
  command = install.group(1) + install.group(2)
  assert command in README.replace("\n", " ")
  assert f"SKIPPED [1] tests/test_hf.py:" in result.stdout
  assert f"Hugging Face parity tests need PyTorch: {command}" in result.stdout
  assert "1 skipped" in result.stdout


def _shown_quick_start():
  return next(b for b in _blocks("") if b.startswith("workdir: runs/tiny-"))


@pytest.mark.slow
def test_quick_start_and_generate_as_written(tmp_path):
  """The quick start's `mla-jax train` (its `pip install -e .` is what CI's install did) in a
  fresh directory, then the generate block verbatim: the losses, the sample and the generated
  text are the README's to the last digit; timings and memory figures may differ."""
  train = _bash("quick start").split("&&")[1].strip()
  result = subprocess.run(shlex.split(train.replace("mla-jax", MLA_JAX, 1)), cwd=tmp_path,
                          capture_output=True, text=True, timeout=3600)
  assert result.returncode == 0, result.stderr
  deterministic = lambda text: [re.sub(r", [\d,]+ tokens/s$", "", line)  # noqa: E731
                                for line in text.splitlines()
                                if not line.startswith(("compiled the", "data: Python stdlib"))]
  printed = deterministic(result.stdout)
  assert set(deterministic(_shown_quick_start())) <= set(printed)
  command = _bash("generate").strip().replace("mla-jax", MLA_JAX, 1)
  generated = subprocess.run(shlex.split(command), cwd=tmp_path, capture_output=True, text=True,
                             timeout=600)
  assert generated.returncode == 0, generated.stderr
  shown = next(b for b in _blocks("") if b.startswith("class Stack:"))
  assert generated.stdout == "".join(l + "\n" for l in shown.splitlines() if not l.startswith(
      ("compile:", "of which", "loaded step")))


@pytest.mark.slow
def test_training_examples_run(tmp_path):
  """Each line of the training block, as written plus `train.steps=4 train.eval_every=2
  train.sample_tokens=0` (as written they train for minutes each); ~ is a HOME made here."""
  corpus = tmp_path / "home" / "corpus"
  corpus.mkdir(parents=True)
  for name in ("a", "b", "c"):
    (corpus / f"{name}.txt").write_text((ROOT / "README.md").read_text())
  env = {**os.environ, "HOME": str(tmp_path / "home")}
  for line in _bash("training examples").strip().splitlines():
    command = line.split("#")[0].strip() + " train.steps=4 train.eval_every=2 train.sample_tokens=0"
    result = subprocess.run(["bash", "-c", command.replace("mla-jax", shlex.quote(MLA_JAX), 1)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (command, result.stderr)
    assert "final: step 4" in result.stdout, command
  assert (tmp_path / "runs" / "long" / "checkpoints" / "4").is_dir()


@pytest.mark.slow
def test_deepseek_block_as_written(tmp_path):
  """Both lines verbatim, with ~/models/DeepSeek-V2-Lite a tiny random DeepseekV2 saved by
  transformers (the real one is a 30 GB download) with a word-level tokenizer."""
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
  result = subprocess.run(["bash", "-c", _bash("deepseek").replace("mla-jax", shlex.quote(MLA_JAX))
                           ], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("wrote runs/v2-lite")
  assert "The capital of France is" in result.stdout


@pytest.mark.slow
def test_pod_command_as_written(tmp_path):
  """The multi-host command under a simulated one-process SLURM job (JAX finds its coordinator
  from SLURM's variables, as it would on a cluster), with workdir=/mnt/shared/run replaced by a
  directory here and train.steps=2 train.batch_size=8 train.seq_len=64 train.eval_batches=1
  train.sample_tokens=0 train.warmup_steps=null appended (as written it trains small.yaml for
  20,000 steps, on accelerators)."""
  command = _bash("pod").strip().replace("/mnt/shared/run", str(tmp_path / "run"))
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
