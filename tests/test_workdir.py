"""mla_jax.workdir: a workdir's parameters restored alone (no optimizer), and `mla-jax generate`
and mla_jax.load_hf importing no training code. Runs on the 8 fake CPU devices."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from mla_jax.checkpoint import CheckpointError, Checkpoints
from mla_jax.config import ModelConfig, load_config
from mla_jax.workdir import load_checkpoint, read_workdir_config
from tests.helpers import DATA, SMALL_MODEL

# Run in a fresh interpreter after the code under test: the training modules it must not import.
NO_TRAINING = ("import sys; loaded = sorted(m for m in sys.modules if m == 'optax' or "
               "m.startswith(('optax.', 'mla_jax.train'))); assert not loaded, loaded")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir of `mla-jax train` after 2 steps (checkpoints at steps 1 and 2)."""
  from mla_jax.train import train

  workdir = tmp_path_factory.mktemp("run") / "w"
  config = load_config(None, f"workdir={workdir}", f"data.path={DATA}", *SMALL_MODEL,
                       "train.steps=2", "train.batch_size=8", "train.seq_len=32",
                       "train.warmup_steps=1", "train.eval_batches=1", "train.checkpoint_every=1",
                       "train.sample_tokens=0")
  summary = train(config, log=lambda _: None, progress=False)
  return workdir, summary


def test_train_checkpoint_restores_the_parameters_alone(trained):
  from mla_jax.train import Trainer

  workdir, summary = trained
  config, params, step = load_checkpoint(workdir)
  assert step == 2 and config == read_workdir_config(workdir)
  full = Checkpoints(workdir, 3)
  try:  # the whole train state, as a resumed run restores it
    state = full.restore(step, Trainer.build(config).abstract_state())
  finally:
    full.close()
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(state.params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, state.params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, summary["params"])
  assert all(len(x.devices()) == 1 for x in jax.tree_util.tree_leaves(params))


def test_checkpoint_written_before_newer_model_fields_loads(trained, tmp_path):
  """A workdir from an older mla-jax (its config.yaml and checkpoint record lack fields added to
  ModelConfig since, such as decode_kernel and flash_block_q) loads with those fields at their
  defaults; a recorded field that differs is still refused."""
  import yaml

  workdir, _ = trained
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy)
  newer = ("decode_kernel", "flash_block_q", "flash_block_k")
  meta_file = copy / "checkpoints" / "2" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  for name in newer:
    del meta["model"][name]
  meta_file.write_text(json.dumps(meta))
  config_file = copy / "config.yaml"
  written = yaml.safe_load(config_file.read_text())
  for name in newer:
    del written["model"][name]
  config_file.write_text(yaml.safe_dump(written))
  config, params, step = load_checkpoint(copy)
  assert step == 2 and config.model.flash_block_q == ModelConfig.flash_block_q
  assert config.model.decode_kernel == "auto"
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, load_checkpoint(workdir)[1])
  meta["model"]["hidden_size"] += 8
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"is of another model than its config.yaml; differing "
                                       r"fields: model.hidden_size"):
    load_checkpoint(copy)


def test_damaged_train_checkpoint_is_named(trained, tmp_path):
  workdir, _ = trained
  copy = tmp_path / "w"
  shutil.copytree(workdir, copy)
  damaged = copy / "checkpoints" / "2" / "state" / "_METADATA"
  damaged.write_text('{"truncated')
  with pytest.raises(CheckpointError, match=r"cannot be read \(.* is not valid JSON\): it is "
                                            "damaged or incomplete"):
    load_checkpoint(copy)


def test_generate_imports_no_optimizer_and_no_training_module(trained):
  workdir, _ = trained
  code = ("from mla_jax.cli import main; "
          f"assert main(['generate', '--checkpoint', {str(workdir)!r}, '--prompt', 'def ', "
          "'--max-new-tokens', '3', '--temperature', '0']) == 0; " + NO_TRAINING)
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("def ")
  assert "loaded step 2 of" in result.stderr


def test_load_hf_imports_no_optimizer_and_no_training_module(tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  from mla_jax.hf import model_config_from_hf, tensor_map

  hf = dict(model_type="deepseek_v2", vocab_size=64, hidden_size=16, intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=8,
            qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, max_position_embeddings=32)
  (tmp_path / "config.json").write_text(json.dumps(hf))
  rng = np.random.default_rng(0)
  safetensors_numpy.save_file(
      {name: rng.normal(size=shape).astype(np.float32)
       for name, (shape, _) in sorted(tensor_map(model_config_from_hf(hf)).items())},
      str(tmp_path / "model.safetensors"))
  code = ("import mla_jax; model, params = mla_jax.load_hf(" + repr(str(tmp_path)) + "); "
          "assert params['embed_tokens'].shape == (64, 16); " + NO_TRAINING)
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr
