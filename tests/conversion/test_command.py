"""`mla-jax convert-to-mla` end to end: a GQA workdir becomes an MLA workdir that generates, that
`mla-jax train --init-from` fine-tunes and `mla-jax export` hands to Hugging Face; calibration
text from a path; each bad input refused on one line, before anything is written."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import mla_jax
from mla_jax.config import Config, TrainConfig
from mla_jax.conversion.calibration import calibration_tokens
from mla_jax.tokenizers import ByteTokenizer
from mla_jax.workdir import write_params_workdir
from tests.conversion.helpers import source, variant
from tests.helpers import DATA

BYTES = variant(vocab_size=260, max_seq_len=64)  # the byte tokenizer's vocabulary


def _run(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "mla_jax.cli", *args], capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture(scope="module")
def gqa_workdir(tmp_path_factory):
  """A GQA workdir as `mla-jax train` leaves one (byte tokenizer, no special_tokens.json)."""
  workdir = tmp_path_factory.mktemp("gqa") / "run"
  _, params = source(BYTES)
  config = Config(model=BYTES, train=TrainConfig(steps=2, batch_size=8, seq_len=32,
                                                 eval_batches=1, sample_tokens=0))
  write_params_workdir(workdir, config, params, {}, special_tokens=False)
  return workdir, params


def test_convert_generate_fine_tune_and_export(gqa_workdir, tmp_path):
  """Exact conversion (full rank, all pairs: two RoPE keys) generates what the source does; a
  DeepSeek-shaped one (one shared key) trains from --init-from and exports."""
  workdir, params = gqa_workdir
  exact = tmp_path / "exact"
  result = _run("convert-to-mla", str(workdir), str(exact), "--kv-lora-rank", "64",
                "--rope-dim", "32", "--method", "transmla")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == ("transmla, weight-only (no calibration): kv_lora_rank 64, k_rope 32 "
                      "(2 RoPE key(s), source pairs 0, 1, 2, ... at rope_theta 10000)")
  assert lines[1].split() == ["layer", "kv", "energy", "kept", "RoPE", "score", "kept",
                              "latent", "norm", "scale"]
  assert [line.split()[:3] for line in lines[2:4]] == [["0", "1.0000", "1.0000"],
                                                      ["1", "1.0000", "1.0000"]]
  assert lines[4] == "KV cache per token per layer: 96 -> 96 elements (0.0% smaller)"
  report = json.loads((exact / "conversion.json").read_text())
  assert report["method"] == "transmla" and len(report["layers"]) == 2
  run = mla_jax.load_run(exact)
  assert run.config.model.qk_rope_groups == 2 and isinstance(run.tokenizer, ByteTokenizer)
  prompt = [list(b"def f(")]
  expected = mla_jax.generate(mla_jax.Transformer(BYTES), params, prompt, max_new_tokens=12)
  np.testing.assert_array_equal(mla_jax.generate(run.model, run.params, prompt,
                                                 max_new_tokens=12), expected)
  refused = _run("export", str(exact), str(tmp_path / "refused"))
  assert refused.returncode == 2 and "model.qk_rope_groups=2: DeepSeek's MLA has one" in \
      refused.stderr

  small = tmp_path / "small"
  assert _run("convert-to-mla", str(workdir), str(small), "--kv-lora-rank", "16",
              "--rope-dim", "16", "--calibration", str(DATA / "conversion"),
              "--calibration-samples", "4").returncode == 0
  train = _run("train", "--init-from", str(small), f"workdir={tmp_path / 'tuned'}",
               f"data.path={DATA}", "train.eval_every=2")
  assert train.returncode == 0, train.stderr
  assert f"initialized from {small} (its step 0); the optimizer starts fresh" in train.stdout
  tuned = mla_jax.load_run(tmp_path / "tuned")
  assert tuned.step == 2 and tuned.config.train.init_from == str(small)
  start = mla_jax.load_run(small).params
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                                 tuned.params, start)
  assert 0 < max(jax.tree_util.tree_leaves(moved)) < 0.1  # fine-tuned from it, not re-drawn
  exported = _run("export", str(tmp_path / "tuned"), str(tmp_path / "hf"))
  assert exported.returncode == 0, exported.stderr
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["kv_lora_rank"] == 16


def test_init_from_names_another_model(gqa_workdir, tmp_path):
  workdir, _ = gqa_workdir
  result = _run("train", "configs/tiny.yaml", "--init-from", str(workdir),
                f"workdir={tmp_path / 'x'}")
  assert result.returncode == 2 and not (tmp_path / "x").exists()
  message = result.stderr.splitlines()
  assert len(message) == 1 and message[0].startswith(
      f"mla-jax: error: train.init_from={str(workdir)!r} holds another model than this config's; "
      "differing fields: model.attention: 'gqa' -> 'mla'")


def test_bad_input_is_refused_on_one_line(gqa_workdir, tmp_path):
  workdir, _ = gqa_workdir
  (tmp_path / "empty").mkdir()
  (tmp_path / "blank").mkdir()
  (tmp_path / "blank" / "a.txt").write_text("")
  deepseek = tmp_path / "deepseek"
  deepseek.mkdir()
  (deepseek / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  base = ["--kv-lora-rank", "16", "--rope-dim", "16"]
  cases = [
      ([str(deepseek), "o"] + base,
       f"{deepseek / 'config.json'}: model_type='gpt2' is not supported: convert-to-mla takes "
       "llama, mistral directories and mla-jax MHA/GQA/MQA workdirs"),
      ([str(tmp_path / "empty"), "o"] + base,
       f"{tmp_path / 'empty'} is neither an mla-jax workdir (config.yaml) nor a Hugging Face "
       "model directory (config.json)"),
      ([str(workdir), "o", "--kv-lora-rank", "65", "--rope-dim", "16"],
       "--kv-lora-rank 65 is larger than possible: the latent is a linear function of the "
       "64-wide hidden state (model.hidden_size), so it is at most 64"),
      ([str(workdir), "o", "--kv-lora-rank", "16", "--rope-dim", "15"],
       "--rope-dim 15 does not divide into RoPE pairs: give a positive even number (each pair "
       "is two features rotated together), at most 16 for one shared key as DeepSeek's MLA has"),
      ([str(workdir), "o", "--calibration", str(tmp_path / "empty")] + base,
       f"--calibration={str(tmp_path / 'empty')!r} matches no files"),
      ([str(workdir), "o", "--calibration", str(tmp_path / "blank")] + base,
       f"--calibration={str(tmp_path / 'blank')!r} matches only empty files (1)"),
  ]
  for args, message in cases:
    result = _run("convert-to-mla", *args)
    assert result.returncode == 2, (args, result.stderr)
    assert result.stderr.splitlines() == [f"mla-jax: error: {message}"], args
  assert not (tmp_path / "o").exists() and not any(p.name == "o" for p in tmp_path.iterdir())


def test_calibration_windows_come_from_the_training_split(tmp_path):
  """Files that `mla-jax train` holds out for validation stay out of calibration."""
  from mla_jax.config.run import DataConfig
  from mla_jax.train.data import load_corpus

  windows = calibration_tokens(str(DATA), ByteTokenizer(), 64, 32)
  assert windows.shape == (32, 64) and windows.dtype == np.int32
  corpus = load_corpus(DataConfig(path=str(DATA)), 65)
  train = corpus.train.tobytes()
  val = corpus.val.astype(np.uint16).tobytes()
  for row in windows[:8]:
    piece = row.astype(np.uint16).tobytes()
    assert piece in train and piece not in val
  # One file: its last 5% is validation, so "abc" trains on "ab" and its EOS, 3 tokens.
  with pytest.raises(ValueError, match=r"holds 3 tokens in its training split, fewer than one "
                                       r"window of 65: give more text"):
    (tmp_path / "short.txt").write_text("abc")
    calibration_tokens(str(tmp_path / "short.txt"), ByteTokenizer(), 64, 2)
