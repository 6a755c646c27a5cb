"""`mla-jax train`: the loop of next-token training with optax AdamW, orbax checkpoints and
automatic resume.

Order of work: validate everything that can be wrong (config, devices, workdir, data, the compiled
step's memory) before the first array is built; then init or restore; then the loop. Batches are a
function of (seed, step), so the checkpointed step is the whole data position, and a resumed run
repeats an unbroken one.

A workdir belongs to one run: the fields that define its checkpoints (Config.run_fields: model,
data, seed, optimisation) are stored in every checkpoint, and a command whose fields differ is
refused, naming them. A run that reached train.steps is complete: running it again says so and
does nothing else. Signals: see mla_jax/interrupts.py.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax

from mla_jax import workdir as layout
from mla_jax.checkpoint import Checkpoints
from mla_jax.config.loader import DEFAULT_NAME
from mla_jax.config.run import Config
from mla_jax.interrupts import INTERRUPTS
from mla_jax.model import Transformer
from mla_jax.sampling import generate
from mla_jax.tokenizers import ByteTokenizer
from mla_jax.train.checks import check_inputs
from mla_jax.train.data import (MAX_NON_TEXT, TRAIN_STREAM, Corpus, batch_at, load_corpus,
                                unigram_entropy)
from mla_jax.train.memory import check_memory
from mla_jax.train.metrics import MetricsLog, plot_losses
from mla_jax.train.step import Trainer, TrainingError, TrainState
from mla_jax.workdir import check_workdir


class _Progress:
  """Progress bar on a terminal (a plain line every train.log_every steps when stderr is not
  one: logs), tokens/s, and the metrics records: the loop only reports what happened."""

  def __init__(self, config: Config, start: int, metrics_log: Optional[MetricsLog], log: Callable,
               enabled: bool):
    from tqdm import tqdm

    self.tc, self.metrics_log, self.log, self.enabled = config.train, metrics_log, log, enabled
    self.interactive = enabled and sys.stderr.isatty()
    self.bar = tqdm(total=self.tc.steps, initial=start, disable=not self.interactive,
                    unit="step", dynamic_ncols=True)
    self.last_time, self.last_step = time.perf_counter(), start
    self.latest: dict[str, Any] = {}

  def train_step(self, step: int, metrics: dict) -> dict[str, Any]:
    """The record of a logged step ({} between log steps); fetching it syncs with the device."""
    self.bar.update(1)
    if step % self.tc.log_every and step != self.tc.steps:
      return {}
    values = jax.device_get(metrics)  # waits for the step: only then is its time known
    now = time.perf_counter()
    tokens = self.tc.batch_size * self.tc.seq_len * (step - self.last_step)
    record = {"step": step, "loss": float(values["loss"]),
              "learning_rate": float(values["learning_rate"]),
              "grad_norm": float(values["grad_norm"]),
              "tokens_per_sec": tokens / (now - self.last_time),
              "skipped_updates": int(values["skipped_updates"])}
    record.update({name: float(values[name]) for name in sorted(values)  # MTP runs: the parts
                   if name == "main_loss" or name.startswith(("mtp_loss_", "mtp_accuracy_"))})
    self.last_time, self.last_step = now, step
    self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_sec']:,.0f}")
    if self.enabled and not self.interactive:
      self.log(f"step {step}: loss {record['loss']:.4f}{_mtp_parts(record)}, lr "
               f"{record['learning_rate']:.2e}, {record['tokens_per_sec']:,.0f} tokens/s")
    return record

  def validation(self, step: int, val_loss: float, terms: dict[str, float]) -> dict[str, Any]:
    record = {"step": step, "val_loss": val_loss, "val_perplexity": math.exp(val_loss),
              **{f"val_{name}": value for name, value in terms.items()}}
    if self.enabled:
      self.bar.write(f"step {step}: validation loss {val_loss:.4f} (perplexity "
                     f"{math.exp(val_loss):.2f}){_mtp_parts(record, 'val_')}")
    return record

  def write(self, record: dict[str, Any]) -> None:
    if record:
      if self.metrics_log is not None:
        self.metrics_log.write(record)
      self.latest.update(record)

  def close(self) -> None:
    self.bar.close()
    if self.metrics_log is not None:
      self.metrics_log.close()


def _mtp_parts(record: dict[str, Any], prefix: str = "") -> str:
  """', next-token 1.2345; MTP 1.9876 (accuracy 41.2%)' for a record with MTP terms (one
  figure per depth, '/'-separated), '' without; prefix 'val_' reads the validation ones."""
  depths = sorted(int(name[len(prefix) + 9:]) for name in record
                  if name.startswith(prefix + "mtp_loss_"))
  if not depths:
    return ""
  main = record.get(prefix + "main_loss")
  losses = "/".join(f"{record[f'{prefix}mtp_loss_{k}']:.4f}" for k in depths)
  accuracy = "/".join(f"{record[f'{prefix}mtp_accuracy_{k}']:.1%}" for k in depths)
  return (("" if main is None else f", next-token {main:.4f}")
          + f"; MTP {losses} (accuracy {accuracy})")


def _print(line: str) -> None:
  print(line, flush=True)  # a log file sees each line when it happens, not in 8 KiB blocks


def train(config: Config, log: Callable[[str], None] = _print, progress: bool = True) -> dict:
  """Trains (or resumes) per config; returns a summary: final params, losses, steps, and
  `interrupted` (the signal's name) or `already_complete` (True when there was nothing to do).

  Raises ValueError (before any array is built) for a bad config, a workdir of another run, or
  a step that does not fit in memory; TrainingError when updates keep being non-finite."""
  with INTERRUPTS.install():
    return _train(config.with_default_workdir(DEFAULT_NAME), log, progress)


def _train(config: Config, log: Callable[[str], None], progress: bool) -> dict:
  tc = config.train
  check_inputs(config)  # config, workdir and data path: before JAX does anything
  trainer = Trainer.build(config)  # validates mesh, batch split and sharded dimensions
  main_process = jax.process_index() == 0  # only process 0 logs and writes files besides orbax's
  if not main_process:
    log, progress = (lambda _: None), False
  workdir = Path(config.workdir)
  resume_step = check_workdir(config)
  summary = {"start_step": resume_step or 0, "final_step": resume_step or 0, "interrupted": None,
             "already_complete": False, "main_process": main_process,
             "multi_process": jax.process_count() > 1, "workdir": str(workdir)}
  if resume_step is not None and resume_step >= tc.steps:
    return {**summary, "already_complete": True}
  INTERRUPTS.set_stage("before training started; no checkpoint was saved" if resume_step is None else
                       f"before training resumed; the workdir still holds step {resume_step}")
  log(f"workdir: {workdir} ({'new run' if resume_step is None else 'resuming'}; "
      f"run id {config.run_id()})")
  corpus = load_corpus(config.data, min_tokens=tc.seq_len + 1)
  mesh = " x ".join(f"{axis}={size}" for axis, size in trainer.mesh.shape.items())
  log(f"data: {corpus.source}: {corpus.num_files} files, {len(corpus.train):,} train / "
      f"{len(corpus.val):,} validation tokens; {jax.device_count()} device(s) in "
      f"{jax.process_count()} process(es), mesh {mesh}")
  if corpus.binary_files:
    (first, share), count = corpus.binary_files[0], len(corpus.binary_files)
    log(f"warning: {count} of the files sampled in data.path look binary (more than "
        f"{MAX_NON_TEXT:.0%} non-text bytes), e.g. {first!r} ({share:.1%}); they are trained on "
        "as bytes: narrow data.path to the text files (a glob such as 'dir/**/*.py') to leave them out")
  log(f"unigram entropy of the validation tokens: {unigram_entropy(corpus.val):.4f} nats/token "
      "(the loss of a model that ignores context)")
  started = time.perf_counter()
  compiled = trainer.compile_train_step()
  shape = trainer.mesh.shape
  fit = check_memory(config, compiled, list(trainer.mesh.local_devices),
                     batch_shards=shape["data"] * shape["fsdp"], head_shards=shape["tensor"])
  log(f"compiled the train step in {time.perf_counter() - started:.1f} s"
      + (f"; {fit}" if fit else ""))

  workdir.mkdir(parents=True, exist_ok=True)
  if main_process:  # the run fields are equal to the checkpoint's (check_workdir), so it is true
    layout.write_config(workdir, config)
  checkpoints = Checkpoints(workdir, tc.keep_checkpoints)
  try:
    if resume_step is None and tc.init_from is not None:
      from mla_jax.workdir import load_checkpoint

      _, params, start_step = load_checkpoint(tc.init_from, trainer.abstract_state().params)
      state = trainer.state_from_params(params)
      log(f"initialized from {tc.init_from} (its step {start_step}); the optimizer starts fresh")
    elif resume_step is None:
      state = trainer.init_state()
    else:
      state = checkpoints.restore(resume_step, trainer.abstract_state())
      log(f"resumed from {checkpoints.directory / str(resume_step)} (step {resume_step})")
    start = int(state.step)
    return {**summary, **_loop(config, trainer, corpus, checkpoints, state, start, log, progress,
                               main_process)}
  finally:  # also on errors: finish pending async saves so no checkpoint is left half-written
    checkpoints.close()


def _loop(config: Config, trainer: Trainer, corpus: Corpus, checkpoints: Checkpoints,
          state: TrainState, start: int, log: Callable, progress: bool,
          main_process: bool) -> dict:
  """Steps start+1..train.steps; a signal (mla_jax/interrupts.py) saves and stops."""
  tc, workdir = config.train, Path(config.workdir)
  meta = lambda step: {"model": config.model.to_dict(), "run": config.run_fields(),  # noqa: E731
                       "step": step, "data_position": {"seed": config.seed, "next_batch": step}}
  interrupted, previous = None, None
  INTERRUPTS.set_stage(f"the last complete checkpoint in {checkpoints.directory} is intact; run "
                       "the same command to resume from it")

  def stop_if_diverged(step_and_metrics) -> None:
    if step_and_metrics is None:
      return
    step, metrics = step_and_metrics
    if int(metrics["nonfinite_in_a_row"]) >= tc.max_nonfinite_steps:
      raise TrainingError(
          f"{tc.max_nonfinite_steps} non-finite updates in a row (step {step}); stopped. The "
          f"last checkpoint (step {checkpoints.latest_step()}) holds finite parameters; lower "
          "train.learning_rate or check the data.")

  # Deferred from here to the plot: metrics.jsonl is rewritten on a resume, checkpoints and
  # loss.png are written, so a signal waits for a step boundary (a second one exits at once).
  with INTERRUPTS.deferred() as stop:
    metrics_log = MetricsLog(workdir, resume_step=start) if main_process else None
    report = _Progress(config, start, metrics_log, log, progress)
    try:
      if start == 0 and tc.init_from is not None:  # the starting model, before any update
        report.write(report.validation(0, *trainer.evaluate_terms(state.params, corpus)))
      for step in range(start + 1, tc.steps + 1):
        batch = batch_at(corpus.train, config.seed, TRAIN_STREAM, step - 1, tc.batch_size,
                         tc.seq_len)
        state, metrics = trainer.train_step(state, *trainer.put_batch(*batch))
        # Read the previous step's counter, not this one's: the device stays a step ahead
        # instead of idling while the host waits on every step.
        stop_if_diverged(previous)
        previous = (step, metrics)
        record = report.train_step(step, metrics)
        if step % tc.eval_every == 0 or step == tc.steps:
          record.update(report.validation(step, *trainer.evaluate_terms(state.params, corpus)))
        report.write(record)
        if stop.requested is not None:
          stop_if_diverged(previous)
          checkpoints.save(step, state, meta(step), wait=True)
          interrupted = stop.requested
          log(f"{interrupted}: saved step {step} to {checkpoints.directory}; run the same command "
              "to resume")
          break
        if step % tc.checkpoint_every == 0 or step == tc.steps:
          checkpoints.save(step, state, meta(step))
      stop_if_diverged(previous)
      checkpoints.wait()
      final = int(state.step)
      INTERRUPTS.set_stage(f"after step {final} was saved to {checkpoints.directory}")
    finally:
      report.close()
    if main_process and layout.metrics_path(workdir).exists():
      log(f"wrote {plot_losses(workdir)}")
    if interrupted is None and stop.requested is not None:  # arrived after the last step
      interrupted = stop.requested
      log(f"{interrupted}: training had finished; step {final} is saved")
  return {**report.latest, "start_step": start, "final_step": final,
          "interrupted": interrupted, "params": state.params}


def sample_text(config: Config, params, prompt: str, max_new_tokens: int, temperature: float,
                seed: int) -> str:
  tokenizer = ByteTokenizer()
  ids = tokenizer.encode(prompt) or [tokenizer.BOS]
  budget = min(max_new_tokens, config.model.max_seq_len - len(ids))
  if budget <= 0:
    raise ValueError(f"train.sample_prompt is {len(ids)} tokens: no room left within "
                     f"model.max_seq_len ({config.model.max_seq_len})")
  out, lengths = generate(Transformer(config.model), params, [ids], max_new_tokens=budget,
                          temperature=temperature, eos_id=tokenizer.EOS, seed=seed,
                          pad_id=tokenizer.PAD, return_lengths=True)
  return tokenizer.decode(out[0, :lengths[0]])
