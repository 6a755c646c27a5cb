"""`mla-jax train`: resume after SIGKILL is bit-exact, SIGTERM saves, NaN updates are skipped,
and bad inputs fail before training. Runs on the 8 fake CPU devices (data parallel)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mla_jax import train as train_module
from mla_jax.train import step as train_step_module
from mla_jax.checkpoint import Checkpoints
from mla_jax.config import load_config
from mla_jax.train.metrics import read_metrics
from tests.helpers import DATA, SMALL_MODEL



def overrides(workdir, steps=300, **train):
  settings = dict(steps=steps, batch_size=8, seq_len=32, warmup_steps=5, log_every=1,
                  eval_every=100, eval_batches=2, checkpoint_every=50, keep_checkpoints=10,
                  sample_tokens=40)
  settings.update(train)
  return ([f"workdir={workdir}", f"data.path={DATA}"] + SMALL_MODEL
          + [f"train.{k}={v}" for k, v in settings.items()])


def cli(args):
  return [sys.executable, "-m", "mla_jax.cli", "train", *args]


def final_params(workdir):
  manager = ocp.CheckpointManager(Path(workdir).resolve() / "checkpoints")
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  return step, restored["state"]["params"]


def losses(workdir):
  return {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def unbroken_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("unbroken")
  result = subprocess.run(cli(overrides(workdir)), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  return workdir, result


def _wait_for(predicate, process, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if process.poll() is not None:
      raise AssertionError(f"process ended early: {process.returncode}")
    time.sleep(0.01)
  raise AssertionError("timed out")


def test_unbroken_run_writes_metrics_plots_and_a_sample(unbroken_run):
  workdir, result = unbroken_run
  records = read_metrics(workdir)
  logged = [r for r in records if "loss" in r]
  assert [r["step"] for r in logged] == list(range(1, 301))
  assert {"step", "loss", "learning_rate", "tokens_per_sec", "grad_norm"} <= set(logged[0])
  val = [r for r in records if "val_loss" in r]
  assert [r["step"] for r in val] == [100, 200, 300]
  assert val[-1]["val_perplexity"] == pytest.approx(np.exp(val[-1]["val_loss"]), rel=1e-6)
  assert np.mean([r["loss"] for r in logged[-20:]]) < np.mean([r["loss"] for r in logged[:20]]) - 1
  assert logged[0]["learning_rate"] == 0.0 and logged[5]["learning_rate"] == pytest.approx(3e-3)
  assert (workdir / "loss.png").stat().st_size > 10_000
  assert any((workdir / "tensorboard").iterdir())
  assert load_config(workdir / "config.yaml").train.steps == 300
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [50, 100, 150, 200,
                                                                              250, 300]
  assert "final: step 300" in result.stdout and "sample (temperature 0.8, seed 0):" in result.stdout


@pytest.mark.slow  # SIGTERM-and-resume stays in the default suite
def test_resume_after_sigkill_is_bit_exact(unbroken_run, tmp_path):
  reference, _ = unbroken_run
  workdir = tmp_path / "killed"
  process = subprocess.Popen(cli(overrides(workdir)), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  try:
    _wait_for(lambda: (workdir / "checkpoints" / "100").is_dir(), process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
  finally:
    process.kill()
  assert process.returncode == -signal.SIGKILL
  killed_at = max(r["step"] for r in read_metrics(workdir))
  resumed_from = Checkpoints(workdir, 10).latest_step()
  assert resumed_from < 300 and killed_at < 300, "the run finished before it could be killed"

  result = subprocess.run(cli(overrides(workdir)), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  assert "resumed from" in result.stdout and f"(step {resumed_from})" in result.stdout
  assert losses(workdir) == losses(reference)  # every step, bit for bit, incl. after the restart
  ref_step, ref_params = final_params(reference)
  step, params = final_params(workdir)
  assert step == ref_step == 300
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref_params)


def test_sigterm_saves_then_exits_cleanly_and_resumes(tmp_path):
  workdir = tmp_path / "term"
  args = overrides(workdir, steps=200, checkpoint_every=1000, sample_tokens=0)
  process = subprocess.Popen(cli(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 20, process)
  process.send_signal(signal.SIGTERM)
  out, err = process.communicate(timeout=120)
  assert process.returncode == 128 + signal.SIGTERM  # 143: a script tells it from a finished run
  assert "Traceback" not in err
  saved = Checkpoints(workdir, 10).latest_step()
  assert 20 <= saved < 200  # saved on the signal, not at a checkpoint_every boundary
  assert f"SIGTERM: saved step {saved}" in out
  assert (workdir / "loss.png").stat().st_size > 10_000  # written on a saved stop too
  resumed = subprocess.run(cli(args), capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr
  assert f"(step {saved})" in resumed.stdout
  assert Checkpoints(workdir, 10).latest_step() == 200


def _stdout_lines_until(process, marker, timeout=300):
  """Reads the child's stdout (unbuffered) until a line contains marker."""
  deadline = time.time() + timeout
  lines = []
  while time.time() < deadline:
    line = process.stdout.readline()
    if not line:
      raise AssertionError(f"process ended before {marker!r}: {lines}")
    lines.append(line)
    if marker in line:
      return lines
  raise AssertionError("timed out")


# Issue 9, item 4: Ctrl-C at any moment, also while importing and compiling, is a clean exit.
@pytest.mark.parametrize("moment", ["after 1 s (imports, setup)", "while compiling"])
def test_sigint_before_training_is_one_line_and_exit_130(tmp_path, moment):
  workdir = tmp_path / "int"
  process = subprocess.Popen(cli(overrides(workdir, sample_tokens=0)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
  try:
    if moment.startswith("after"):
      time.sleep(1.0)
    else:  # the train step is compiled right after the data is read
      _stdout_lines_until(process, "unigram entropy")
      time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
  finally:
    process.kill()
  assert process.returncode == 128 + signal.SIGINT, (process.returncode, err)  # not 139, not < 0
  assert err.strip().splitlines() == [
      "mla-jax: stopped by SIGINT before training started; no checkpoint was saved"], err
  assert "compiled the train step" not in out  # it really was stopped before the loop
  assert not (workdir / "checkpoints").exists() and not (workdir / "config.yaml").exists()


# Issue 9, item 1: a finished workdir says so and does nothing; another run's is refused, and
# neither rewrites config.yaml.
def test_finished_workdir_says_already_complete_and_changes_nothing(unbroken_run):
  workdir, _ = unbroken_run
  config_text = (workdir / "config.yaml").read_text()
  checkpoints = sorted((workdir / "checkpoints").iterdir())
  metrics = (workdir / "metrics.jsonl").read_text()
  result = subprocess.run(cli(overrides(workdir, log_every=5)), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(f"workdir {workdir}: already complete at step 300 "
                                  "(train.steps=300); nothing to do.")
  assert "resumed" not in result.stdout and "sample" not in result.stdout
  assert (workdir / "config.yaml").read_text() == config_text
  assert sorted((workdir / "checkpoints").iterdir()) == checkpoints
  assert (workdir / "metrics.jsonl").read_text() == metrics


@pytest.mark.parametrize("extra, differing", [
    (["data.path=" + str(DATA / "layers")], f"data.path: '{DATA}' -> '{DATA / 'layers'}'"),
    (["train.steps=200"], "train.steps: 300 -> 200"),
    (["train.learning_rate=1e-3"], "train.learning_rate: 0.003 -> 0.001"),
])
def test_workdir_of_another_run_is_refused_naming_fields_and_the_fresh_override(
    unbroken_run, extra, differing):
  workdir, _ = unbroken_run
  config_text = (workdir / "config.yaml").read_text()
  result = subprocess.run(cli(overrides(workdir) + extra), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 2
  (line,) = result.stderr.strip().splitlines()
  fresh = load_config(None, *overrides(workdir) + extra).run_id()
  assert line.startswith(f"mla-jax: error: workdir '{workdir}' holds another run (checkpoint at "
                         "step 300 of train.steps=300); differing fields: "), line
  assert differing in line and f"add workdir={workdir}-{fresh} for a fresh run" in line
  assert (workdir / "config.yaml").read_text() == config_text


# Issue 9, item 5: a converted checkpoint cannot be trained; one line says what to do instead.
def test_training_a_converted_workdir_is_refused_in_one_line(tmp_path, capsys):
  import yaml

  from mla_jax.cli import main
  from mla_jax.config import Config

  config = load_config(None, *SMALL_MODEL, "train.seq_len=32")
  model = train_module.Transformer(config.model)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  workdir = tmp_path / "converted"
  checkpoints = Checkpoints(workdir, 1)
  checkpoints.save_params(0, params, {"model": config.model.to_dict()})  # as `convert` writes
  checkpoints.close()
  converted = Config(model=config.model, train=config.train, workdir=str(workdir))
  (workdir / "config.yaml").write_text(yaml.safe_dump(converted.to_dict(), sort_keys=False))
  assert main(["train", str(workdir / "config.yaml"), f"workdir={workdir}"]) == 2
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith(f"mla-jax: error: workdir '{workdir}' holds a model converted by "
                         "`mla-jax convert`")
  assert f"`mla-jax generate --checkpoint {workdir}`" in line
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["0"]


# Issue 9, item 6: the compiled step's memory is checked against the device before training.
def test_memory_check_refuses_with_figures_and_knobs():
  config = load_config(None, *overrides("unused", steps=10))
  trainer = train_module.Trainer.build(config)
  compiled = trainer.compile_train_step()
  needed = train_module.step_memory(compiled)
  analysis = compiled.memory_analysis()
  assert needed["temporaries"] == analysis.temp_size_in_bytes > 0
  assert needed["arguments"] == analysis.argument_size_in_bytes > 0
  # The state (parameters and two AdamW moments, float32) is in the arguments, per device:
  # replicated over the 8 data-parallel devices, so each holds all of it.
  state_bytes = sum(x.size * x.dtype.itemsize
                    for x in jax.tree_util.tree_leaves(trainer.abstract_state()))
  assert needed["arguments"] >= state_bytes
  devices = list(trainer.mesh.local_devices)
  fits = train_module.check_memory(config, compiled, devices, available=(2**40, "a test budget"))
  assert fits.startswith("train step memory: ") and "available per device (a test budget)" in fits
  with pytest.raises(ValueError) as err:
    train_module.check_memory(config, compiled, devices, available=(needed["total"] - 1, "tiny"))
  message = str(err.value)
  assert message.startswith("the train step needs ") and "from XLA's memory analysis" in message
  for knob in ("train.batch_size (now 8)", "train.seq_len (now 32)", "mesh.fsdp", "mesh.tensor",
               "train.remat=full", "train.attn_impl=flash_attention"):
    assert knob in message
  limit, what = train_module.device_memory_available(devices)
  assert what.endswith("shared by 8 CPU device(s)") and 0 < limit * 8 <= 2**50


@pytest.mark.parametrize("head_dim,unrolled", [(64, True), (32, False)])
def test_memory_description_unrolls_where_the_model_does(monkeypatch, head_dim, unrolled):
  """The pre-check's attention share names the unrolled block pairs exactly where the traced
  training step unrolls them (flash_attention.unrolled_visits on the layer's operands): at 256
  tokens in blocks of 128 (3 pairs), wide heads give operands that outweigh the pairs' scores,
  narrow ones do not."""
  import mla_jax.layers.flash_attention as flash
  from mla_jax.train.memory import attention_memory

  config = load_config(None, "train.attn_impl=flash_attention", "train.seq_len=256",
                       "model.flash_block_q=128", "model.flash_block_k=128",
                       "train.batch_size=2", f"model.qk_nope_head_dim={head_dim}",
                       f"model.v_head_dim={head_dim}", f"model.qk_rope_head_dim={head_dim // 2}")
  traced = []
  real = flash.blocked_attention
  monkeypatch.setattr(flash, "blocked_attention",
                      lambda blocks, ragged, visits: traced.append(visits) or real(
                          blocks, ragged, visits))
  trainer = train_module.Trainer.build(config, devices=jax.devices()[:1])
  trainer.compile_train_step()  # traces the layers
  assert traced and all((v is not None) == unrolled for v in traced), traced
  description = attention_memory(config)[2]
  assert ("3 [B,H,128,128] block pairs side by side, unrolled" in description) == unrolled, (
      description)
  assert ("one [B,H,128,128] block at a time" in description) == (not unrolled), description


@pytest.mark.parametrize("seq_len,flash_calls", [(256, 5), (128, 4)])
def test_memory_description_counts_the_mtp_modules_attention(monkeypatch, seq_len, flash_calls):
  """An MTP module attends over T - 1 tokens: with flash attention like the 4 layers at 256
  tokens (5 flash calls), but on the naive path at 128 (127 tokens: below where 'auto'
  switches). The description counts what the traced step runs."""
  import mla_jax.layers.flash_attention as flash
  from mla_jax.train.memory import attention_memory

  config = load_config(None, f"train.seq_len={seq_len}", "train.batch_size=2",
                       "model.num_mtp_layers=1")
  traced = []
  real = flash.blocked_attention
  monkeypatch.setattr(flash, "blocked_attention",
                      lambda blocks, ragged, visits: traced.append(visits) or real(
                          blocks, ragged, visits))
  def flash_calls_traced(config) -> int:
    traced.clear()
    train_module.Trainer.build(config, devices=jax.devices()[:1]).compile_train_step()
    return len(traced)

  without_mtp = load_config(None, f"train.seq_len={seq_len}", "train.batch_size=2")
  # Building and compiling may trace the layers more than once: count the MTP module's calls
  # as those the same model without it does not make.
  assert flash_calls_traced(config) - flash_calls_traced(without_mtp) == flash_calls - 4
  path, _, description = attention_memory(config)
  assert path == "flash_attention"
  assert f"for the backward pass: {flash_calls} x " in description, description
  assert f"(4 layers and {flash_calls - 4} MTP module(s)" in description, description
  assert ("run the other path" in description) == (flash_calls == 4), description


# `mla-jax train` on one device whose memory the pre-check is told is 2 GiB: at seq_len 16,384
# the naive path's step is refused before anything is allocated; flash attention's trains.
_BUDGET_DRIVER = """
import sys
import mla_jax.device_memory as memory
memory.host_memory_available = lambda: 2 * 2**30
from mla_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""
_LONG = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
         "model.q_lora_rank=null", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8",
         "model.qk_rope_head_dim=8", "model.v_head_dim=8", "model.intermediate_size=64",
         "model.max_seq_len=16384", "train.seq_len=16384", "train.batch_size=1", "train.steps=2",
         "train.warmup_steps=0", "train.log_every=1", "train.eval_every=2", "train.eval_batches=1",
         "train.sample_tokens=0", f"data.path={DATA}"]


def _train_on_a_2_gib_device(tmp_path, *extra):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, "-c", _BUDGET_DRIVER, "train", *_LONG,
                         f"workdir={tmp_path / 'run'}", *extra],
                        capture_output=True, text=True, timeout=600, env=env)


def test_seq_len_16384_trains_with_flash_attention_where_naive_is_refused(tmp_path):
  refused = _train_on_a_2_gib_device(tmp_path, "train.attn_impl=naive")
  assert refused.returncode == 2, refused.stderr
  (line,) = refused.stderr.strip().splitlines()
  assert line.startswith("mla-jax: error: the train step needs ")
  assert ("of it, naive attention keeps each layer's [B,H,T,T] float32 softmax for the "
          "backward pass: 1 x 2.00 GiB") in line
  assert "more than the 2.00 GiB per device available" in line
  assert "train.attn_impl=flash_attention" in line
  assert not (tmp_path / "run").exists()  # refused before the workdir was made

  trained = _train_on_a_2_gib_device(tmp_path)  # train.attn_impl=auto
  assert trained.returncode == 0, trained.stderr
  fit = next(line for line in trained.stdout.splitlines() if "train step memory: " in line)
  assert "of it, flash attention keeps each layer's [B,H,T] log-sum-exp" in fit
  assert "2.00 GiB available per device" in fit
  assert "final: step 2, train loss " in trained.stdout

def _trainer_and_state():
  config = load_config(None, *overrides("unused", steps=10))
  trainer = train_module.Trainer.build(config)
  return config, trainer, trainer.init_state()


def test_nan_gradient_is_skipped_and_counted():
  config, trainer, state = _trainer_and_state()
  inputs = jnp.zeros((8, 32), jnp.int32)
  loss, grads, terms = train_module.compute_grads(trainer.model, state.params, inputs, inputs)
  assert terms == {}  # no MTP modules: no loss parts
  poisoned = jax.tree_util.tree_map(lambda g: g, grads)
  poisoned["layers_0"]["self_attn"]["kv_b_proj"] = grads["layers_0"]["self_attn"][
      "kv_b_proj"].at[0, 0, 0].set(jnp.nan)
  apply = jax.jit(lambda s, l, g: train_module.apply_gradients(trainer.optimizer,
                                                               trainer.schedule, s, l, g))
  skipped, metrics = apply(state, loss, poisoned)
  jax.tree_util.tree_map(np.testing.assert_array_equal, skipped.params, state.params)
  assert int(metrics["skipped_updates"]) == 1 and int(metrics["nonfinite_in_a_row"]) == 1
  assert int(skipped.step) == 1
  updated, metrics = apply(skipped, loss, grads)
  assert int(metrics["skipped_updates"]) == 1 and int(metrics["nonfinite_in_a_row"]) == 0
  assert float(metrics["learning_rate"]) == 0.0  # warmup starts at 0: the skip did not count
  updated, metrics = apply(updated, loss, grads)
  assert float(metrics["learning_rate"]) == pytest.approx(3e-3 / 5)
  assert not np.array_equal(updated.params["lm_head"], state.params["lm_head"])
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(updated.params))


@pytest.mark.slow  # a skipped NaN update stays in the default suite
def test_non_finite_updates_in_a_row_stop_training(tmp_path, monkeypatch):
  real = train_module.compute_grads

  def always_nan(*args):
    loss, grads, terms = real(*args)
    return loss, jax.tree_util.tree_map(lambda g: g * jnp.nan, grads), terms

  config = load_config(None, *overrides(tmp_path / "nan", steps=50, checkpoint_every=2,
                                        max_nonfinite_steps=3, sample_tokens=0))
  monkeypatch.setattr(train_step_module, "compute_grads", always_nan)
  with pytest.raises(train_module.TrainingError, match="3 non-finite updates in a row"):
    train_module.train(config, log=lambda _: None, progress=False)
  # The checkpoint at step 2 holds the (never updated) finite parameters; none came after.
  step, params = final_params(tmp_path / "nan")
  assert step == 2
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


def test_checkpoint_refuses_non_finite_params(tmp_path):
  _, _, state = _trainer_and_state()
  bad = state.replace(params=jax.tree_util.tree_map(lambda p: p * jnp.nan, state.params))
  checkpoints = Checkpoints(tmp_path, 2)
  with pytest.raises(RuntimeError, match="parameters are not finite"):
    checkpoints.save(1, bad, {"model": {}})
  checkpoints.close()
  assert checkpoints.latest_step() is None


@pytest.mark.parametrize("extra, message", [
    (["train.batch_size=6"], r"train\.batch_size=6 .*divisible by mesh\.data x mesh\.fsdp = 8"),
    (["data.path=/nonexistent/*.txt"], r"data\.path='/nonexistent/\*\.txt' matches no files"),
    (["train.stepz=3"], r"unknown config key 'train\.stepz'"),
    (["train.steps=ten"], r"train\.steps='ten' is invalid: expected an integer"),
])
def test_bad_inputs_fail_before_training(tmp_path, extra, message):
  workdir = tmp_path / "bad"
  result = subprocess.run(cli(overrides(workdir) + extra), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 2
  assert len(result.stderr.strip().splitlines()) == 1
  assert __import__("re").search(message, result.stderr), result.stderr
  assert not (workdir / "checkpoints").exists()  # nothing was started


def test_workdir_of_a_different_model_is_refused(unbroken_run, tmp_path):
  reference, _ = unbroken_run
  before = sorted(p.name for p in (reference / "checkpoints").iterdir())
  result = subprocess.run(cli(overrides(reference) + ["model.kv_lora_rank=8",
                                                      "model.num_heads=4"]),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert "model.kv_lora_rank: 16 -> 8" in result.stderr
  assert "model.num_heads: 2 -> 4" in result.stderr
  assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == before


@pytest.mark.slow
def test_small_yaml_fits_the_16_gib_accelerator_its_comment_names():
  """Issue 9, item 6: configs/small.yaml's train step on one device, by XLA's memory analysis."""
  config = load_config("small")
  trainer = train_module.Trainer.build(config, devices=jax.devices()[:1])
  needed = train_module.step_memory(trainer.compile_train_step())
  assert needed["total"] <= 12 * 2**30  # leaves room for the runtime on a 16 GiB device
  from mla_jax.config import PRESETS_DIR

  assert "one accelerator with 16 GiB" in (PRESETS_DIR / "small.yaml").read_text()


@pytest.mark.slow
def test_an_mtp_run_logs_its_loss_parts_and_validates_the_next_token_loss(tmp_path):
  """model.num_mtp_layers=2: the progress line, metrics.jsonl (and so TensorBoard) carry the
  next-token loss, each depth's loss and accuracy; the validation loss stays the next-token one,
  the depths' figures beside it; the logged loss is CE + lambda / D x their sum."""
  lines = []
  config = load_config(None, *overrides(tmp_path / "mtp", steps=4, warmup_steps=1, log_every=2,
                                        eval_every=4, sample_tokens=0, mtp_loss_weight=0.5),
                       "model.num_mtp_layers=2")
  summary = train_module.train(config, log=lines.append, progress=True)
  assert summary["final_step"] == 4
  records = read_metrics(tmp_path / "mtp")
  step = next(r for r in records if r["step"] == 4)
  for key in ("main_loss", "mtp_loss_1", "mtp_loss_2", "mtp_accuracy_1", "mtp_accuracy_2",
              "val_loss", "val_mtp_loss_1", "val_mtp_loss_2", "val_mtp_accuracy_1"):
    assert key in step, key
  assert step["loss"] == pytest.approx(
      step["main_loss"] + 0.5 / 2 * (step["mtp_loss_1"] + step["mtp_loss_2"]), rel=1e-5)
  assert 0 <= step["mtp_accuracy_2"] <= 1 and "val_main_loss" not in step
  logged = [line for line in lines if line.startswith("step 2: loss")]
  assert len(logged) == 1 and "next-token" in logged[0] and "; MTP " in logged[0]
  assert logged[0].count("%") == 2  # one accuracy per depth
  tensorboard = list((tmp_path / "mtp" / "tensorboard").glob("events.*"))
  assert tensorboard and b"mtp_accuracy_1" in tensorboard[0].read_bytes()


def test_tokens_per_second_counts_the_wait_for_the_step(monkeypatch):
  """The logged rate is taken after fetching the step's metrics, which waits for the device (a
  step is dispatched asynchronously): a step whose metrics take 0.2 s to arrive is not reported
  faster than its tokens / 0.2 s."""
  from mla_jax.train import loop

  config = load_config(None, "train.log_every=1", "train.steps=5")
  progress = loop._Progress(config, 0, None, lambda line: None, enabled=False)

  def slow_fetch(tree):
    time.sleep(0.2)
    return {name: np.asarray(value) for name, value in tree.items()}

  monkeypatch.setattr(loop.jax, "device_get", slow_fetch)
  metrics = {"loss": 1.0, "learning_rate": 1e-3, "grad_norm": 1.0, "skipped_updates": 0}
  record = progress.train_step(1, metrics)
  assert 0 < record["tokens_per_sec"] <= config.train.batch_size * config.train.seq_len / 0.2
