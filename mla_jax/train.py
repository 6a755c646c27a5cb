"""`mla-jax train`: next-token training with optax AdamW, orbax checkpoints and automatic resume.

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

import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from jax.sharding import NamedSharding, PartitionSpec

from mla_jax.checkpoint import Checkpoints, check_writable_directory
from mla_jax.config import (DEFAULT_NAME, Config, MeshConfig, TrainConfig, config_from_dict,
                             differing_fields, read_yaml)
from mla_jax.interrupts import INTERRUPTS
from mla_jax.data import ByteTokenizer, Corpus, batch_at, load_corpus, unigram_entropy
from mla_jax.metrics import MetricsLog, plot_losses
from mla_jax.model import Transformer
from mla_jax.sampling import generate
from mla_jax.sharding import batch_sharding, make_mesh, tree_shardings

TRAIN_STREAM, VAL_STREAM = 0, 1
NEVER_APPLY_NONFINITE = 2**31 - 1  # apply_if_finite's cap; we stop at max_nonfinite_steps first


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. non-finite updates in a row); the last checkpoint is intact."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates applied (or skipped) so far
  params: Any
  opt_state: Any


def make_optimizer(tc: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (no decay on norm scales) with warmup + cosine, global-norm clipping, and updates
  skipped while the gradient is non-finite (counted in the optimizer state)."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tc.learning_rate, warmup_steps=tc.warmup,
      decay_steps=tc.steps, end_value=tc.min_learning_rate)
  decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)  # noqa: E731
  inner = optax.chain(
      optax.clip_by_global_norm(tc.grad_clip),
      optax.adamw(schedule, b1=tc.beta1, b2=tc.beta2, weight_decay=tc.weight_decay,
                  mask=decay_mask))
  return optax.apply_if_finite(inner, max_consecutive_errors=NEVER_APPLY_NONFINITE), schedule


def loss_fn(model: Transformer, params, inputs: jax.Array, targets: jax.Array,
            with_aux: bool = True) -> jax.Array:
  """Mean next-token cross-entropy in nats (inputs, targets [B,T]), plus DeepSeekMoE's expert
  balance loss when with_aux and model.aux_loss_alpha > 0 (evaluation reports the plain one)."""
  (logits, _), extra = model.apply({"params": params}, inputs, mutable=["losses"])  # [B,T,V]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  if with_aux:
    # One value per MoE layer; under scan_layers one array of them per scanned group.
    loss = loss + sum((jnp.sum(v) for v in jax.tree_util.tree_leaves(extra.get("losses", {}))),
                      jnp.float32(0))
  return loss


def compute_grads(model: Transformer, params, inputs, targets) -> tuple[jax.Array, Any]:
  return jax.value_and_grad(lambda p: loss_fn(model, p, inputs, targets))(params)


def apply_gradients(optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    state: TrainState, loss: jax.Array, grads) -> tuple[TrainState, dict]:
  """One optimizer update; a non-finite gradient leaves params and moments unchanged."""
  applied_before = state.step - state.opt_state.total_notfinite  # the schedule's own count
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
             "learning_rate": schedule(applied_before),
             "nonfinite_in_a_row": opt_state.notfinite_count,
             "skipped_updates": opt_state.total_notfinite}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


@dataclasses.dataclass
class Trainer:
  """The jitted pieces of one run, built once from a validated config.

  Parameters and optimizer state are created already sharded (jit of init with out_shardings
  from the abstract state), train steps run under the mesh with state donated, and batches are
  assembled from each process's own shards.
  """

  config: Config
  model: Transformer
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: jax.sharding.Mesh

  @classmethod
  def build(cls, config: Config, devices: Optional[list] = None) -> "Trainer":
    """Also validates the mesh against the devices and every sharded dimension (cheap: shapes)."""
    optimizer, schedule = make_optimizer(config.train)
    model = Transformer(config.model, remat=config.train.remat)
    trainer = cls(config, model, optimizer, schedule, make_mesh(config.mesh.sizes(), devices))
    ways = trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"]
    if config.train.batch_size % ways:
      raise ValueError(f"train.batch_size={config.train.batch_size} is invalid: must be divisible "
                       f"by mesh.data x mesh.fsdp = {ways} (the batch is split over them)")
    trainer.state_shardings  # noqa: B018  (raises on an indivisible parameter dimension)
    return trainer

  def _init(self, key: jax.Array) -> TrainState:
    dummy = jnp.zeros((1, self.config.train.seq_len), jnp.int32)
    params = self.model.init(key, dummy)["params"]
    return TrainState(step=jnp.int32(0), params=params, opt_state=self.optimizer.init(params))

  @functools.cached_property
  def _state_shapes(self) -> TrainState:
    return jax.eval_shape(self._init, jax.random.key(0))  # traced once per Trainer

  @functools.cached_property
  def state_shardings(self) -> TrainState:
    return tree_shardings(self._state_shapes, self.mesh)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def init_state(self) -> TrainState:
    init = jax.jit(self._init, out_shardings=self.state_shardings)
    return init(jax.random.key(self.config.seed))

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state: a restore target that allocates nothing."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        self._state_shapes, self.state_shardings)

  @functools.cached_property
  def _train_step(self) -> Callable:
    def step(state, inputs, targets):
      loss, grads = compute_grads(self.model, state.params, inputs, targets)
      return apply_gradients(self.optimizer, self.schedule, state, loss, grads)

    batch = batch_sharding(self.mesh)
    return jax.jit(step, in_shardings=(self.state_shardings, batch, batch),
                   out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))

  def compile_train_step(self) -> Any:
    """Compiles the train step ahead of time (from shapes: nothing allocated) and keeps it for
    train_step; returns the compiled executable, whose memory_analysis() check_memory reads."""
    batch = jax.ShapeDtypeStruct((self.config.train.batch_size, self.config.train.seq_len),
                                 jnp.int32, sharding=batch_sharding(self.mesh))
    with jax.set_mesh(self.mesh):
      self._compiled_step = self._train_step.lower(self.abstract_state(), batch, batch).compile()
    return self._compiled_step

  def train_step(self, state: TrainState, inputs: jax.Array, targets: jax.Array):
    compiled = getattr(self, "_compiled_step", None)
    if compiled is not None:
      return compiled(state, inputs, targets)
    with jax.set_mesh(self.mesh):
      return self._train_step(state, inputs, targets)

  @functools.cached_property
  def _eval_step(self) -> Callable:
    batch = batch_sharding(self.mesh)
    return jax.jit(lambda params, x, y: loss_fn(self.model, params, x, y, with_aux=False),
                   in_shardings=(self.state_shardings.params, batch, batch),
                   out_shardings=self.replicated)

  def put_batch(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Global [B,T] arrays from host numpy: each process places only its own devices' rows."""
    sharding = batch_sharding(self.mesh)
    return tuple(jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
                 for x in (inputs, targets))

  def evaluate(self, params, corpus: Corpus) -> float:
    tc = self.config.train
    with jax.set_mesh(self.mesh):
      losses = [self._eval_step(params, *self.put_batch(*batch_at(
          corpus.val, self.config.seed, VAL_STREAM, i, tc.batch_size, tc.seq_len)))
                for i in range(tc.eval_batches)]
    return float(np.mean(jax.device_get(losses)))


def _saved_run(meta: dict[str, Any]) -> dict[str, Any]:
  """The run fields a checkpoint was saved with (only the model for checkpoints from before
  run fields were stored)."""
  return meta.get("run") or {"model": meta["model"]}


def _same_keys(current: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
  return {k: current[k] for k in saved if k in current}


def check_workdir(config: Config, checkpoints: Optional[Checkpoints] = None) -> Optional[int]:
  """The step to resume from (None: a fresh run). Refuses, naming the differing fields, a
  workdir whose checkpoint belongs to another run, and a workdir written by `mla-jax convert`.
  Opens no checkpoint manager on a fresh workdir (so a refused command leaves no trace)."""
  owned = checkpoints is None
  if owned:
    if not (Path(config.workdir) / "checkpoints").is_dir():
      return None
    checkpoints = Checkpoints(config.workdir, config.train.keep_checkpoints)
  try:
    step = checkpoints.latest_step()
    if step is None:
      return None
    meta = checkpoints.read_meta(step)
  finally:
    if owned:
      checkpoints.close()
  workdir = config.workdir
  if meta.get("params_only"):
    raise ValueError(
        f"workdir {workdir!r} holds a model converted by `mla-jax convert` (parameters only, "
        "with its own tokenizer), and training one is not supported (`mla-jax train` reads byte-"
        f"level text); run it with `mla-jax generate --checkpoint {workdir}`, or train a new "
        "model with another workdir=")
  current = json.loads(json.dumps(config.run_fields()))  # tuples as lists, as stored
  saved = _saved_run(meta)
  differences = differing_fields(saved, _same_keys(current, saved))
  if differences:
    trained_for = saved.get("train", {}).get("steps")
    of = f" of train.steps={trained_for}" if trained_for is not None else ""
    fresh = f"{workdir.rstrip('/')}-{config.run_id()}"
    raise ValueError(
        f"workdir {workdir!r} holds another run (checkpoint at step {step}{of}); differing "
        f"fields: {'; '.join(differences)}. A checkpoint continues only the run that made it: "
        f"add workdir={fresh} for a fresh run, or drop the overrides that differ")
  return step


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
    now = time.perf_counter()
    values = jax.device_get(metrics)
    tokens = self.tc.batch_size * self.tc.seq_len * (step - self.last_step)
    record = {"step": step, "loss": float(values["loss"]),
              "learning_rate": float(values["learning_rate"]),
              "grad_norm": float(values["grad_norm"]),
              "tokens_per_sec": tokens / (now - self.last_time),
              "skipped_updates": int(values["skipped_updates"])}
    self.last_time, self.last_step = now, step
    self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_sec']:,.0f}")
    if self.enabled and not self.interactive:
      self.log(f"step {step}: loss {record['loss']:.4f}, lr {record['learning_rate']:.2e}, "
               f"{record['tokens_per_sec']:,.0f} tokens/s")
    return record

  def validation(self, step: int, val_loss: float) -> dict[str, Any]:
    if self.enabled:
      self.bar.write(f"step {step}: validation loss {val_loss:.4f} (perplexity "
                     f"{math.exp(val_loss):.2f})")
    return {"step": step, "val_loss": val_loss, "val_perplexity": math.exp(val_loss)}

  def write(self, record: dict[str, Any]) -> None:
    if record:
      if self.metrics_log is not None:
        self.metrics_log.write(record)
      self.latest.update(record)

  def close(self) -> None:
    self.bar.close()
    if self.metrics_log is not None:
      self.metrics_log.close()


def check_inputs(config: Config) -> None:
  """What the config alone cannot know: the tokenizer's constraint."""
  if config.model.vocab_size < ByteTokenizer.vocab_size:
    raise ValueError(f"model.vocab_size={config.model.vocab_size} is invalid: the byte tokenizer "
                     f"needs at least {ByteTokenizer.vocab_size}")


def host_memory_available() -> Optional[int]:
  """Bytes the host can still give (MemAvailable in /proc/meminfo; else physical pages)."""
  try:
    for line in Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError):
    return None


def device_memory_available(devices: list) -> Optional[tuple[int, str]]:
  """(bytes one device may use, what that is) for the mesh's local devices: an accelerator's
  bytes_limit, or for CPU devices the host's available memory shared among them."""
  if all(d.platform == "cpu" for d in devices):
    host = host_memory_available()
    if host is None:
      return None
    return host // len(devices), (f"the host's available memory ({_gib(host)}) shared by "
                                  f"{len(devices)} CPU device(s)")
  limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
  if not all(limits):
    return None
  return min(limits), f"{devices[0].device_kind} memory"


def _gib(num_bytes: float) -> str:
  """Bytes in GiB, or MiB below one GiB."""
  if num_bytes >= 2**30:
    return f"{num_bytes / 2**30:,.2f} GiB"
  return f"{num_bytes / 2**20:,.1f} MiB"


def step_memory(compiled: Any) -> Optional[dict[str, int]]:
  """Per-device bytes of a compiled step from XLA's memory analysis: arguments, outputs not
  aliased to donated arguments, temporaries, code; and their sum, the peak to budget for."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  parts = {"arguments": analysis.argument_size_in_bytes,
           "outputs": max(analysis.output_size_in_bytes - analysis.alias_size_in_bytes, 0),
           "temporaries": analysis.temp_size_in_bytes,
           "code": analysis.generated_code_size_in_bytes}
  return {**parts, "total": sum(parts.values())}


def check_memory(config: Config, compiled: Any, devices: list,
                 available: Optional[tuple[int, str]] = None) -> Optional[str]:
  """Refuses (ValueError, with the figures and the knobs that lower them) a train step whose
  compiled memory exceeds what each device has; returns the line that reports the fit."""
  needed = step_memory(compiled)
  available = available or device_memory_available(devices)
  if needed is None or available is None:
    return None
  limit, what = available
  figures = (f"{_gib(needed['total'])} per device ({_gib(needed['arguments'])} parameters, "
             f"optimizer state and batch + {_gib(needed['temporaries'])} activations and other "
             "temporaries, from XLA's memory analysis of the compiled step)")
  if needed["total"] > limit:
    tc = config.train
    raise ValueError(
        f"the train step needs {figures}, more than the {_gib(limit)} per device available "
        f"({what}); lower train.batch_size (now {tc.batch_size}) or train.seq_len (now "
        f"{tc.seq_len}), split the state over more devices with mesh.fsdp / mesh.tensor"
        + (", or recompute activations in the backward pass with train.remat=full (most "
           "effective with model.scan_layers=true)" if tc.remat == "none" else ""))
  return f"train step memory: {figures}; {_gib(limit)} available per device ({what})"


def _write_atomically(path: Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


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
  check_inputs(config)
  trainer = Trainer.build(config)  # validates mesh, batch split and sharded dimensions
  main_process = jax.process_index() == 0  # only process 0 logs and writes files besides orbax's
  if not main_process:
    log, progress = (lambda _: None), False
  workdir = Path(config.workdir)
  check_writable_directory(workdir, "workdir")
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
  log(f"unigram entropy of the validation tokens: {unigram_entropy(corpus.val):.4f} nats/token "
      "(the loss of a model that ignores context)")
  started = time.perf_counter()
  compiled = trainer.compile_train_step()
  fit = check_memory(config, compiled, list(trainer.mesh.local_devices))
  log(f"compiled the train step in {time.perf_counter() - started:.1f} s"
      + (f"; {fit}" if fit else ""))

  workdir.mkdir(parents=True, exist_ok=True)
  if main_process:  # the run fields are equal to the checkpoint's (check_workdir), so it is true
    _write_atomically(workdir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
  checkpoints = Checkpoints(workdir, tc.keep_checkpoints)
  try:
    if resume_step is None:
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
          record.update(report.validation(step, trainer.evaluate(state.params, corpus)))
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
    if main_process and (workdir / "metrics.jsonl").exists():
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


def read_workdir_config(workdir: str | Path) -> Config:
  path = Path(workdir) / "config.yaml"
  if Path(workdir).is_file():
    raise ValueError(f"--checkpoint {str(workdir)!r} is a file; expected a workdir directory "
                     "(from `mla-jax train` or `mla-jax convert`)")
  if not path.is_file():
    raise ValueError(f"--checkpoint {str(workdir)!r} is not a training workdir: no config.yaml")
  return config_from_dict(read_yaml(path))


def load_checkpoint(workdir: str | Path) -> tuple[Config, Any, int]:
  """(config, params, step) of the latest checkpoint in a `mla-jax train` or `mla-jax convert`
  workdir; clear errors for a directory that is not one, or whose checkpoint is of another
  model than its config.yaml."""
  config = read_workdir_config(workdir)
  if not (Path(workdir) / "checkpoints").is_dir():
    raise ValueError(f"--checkpoint {str(workdir)!r} has no checkpoints/ directory")
  checkpoints = Checkpoints(workdir, config.train.keep_checkpoints)
  try:
    step = checkpoints.latest_step()
    if step is None:
      raise ValueError(f"--checkpoint {str(workdir)!r} holds no complete checkpoint")
    meta = checkpoints.read_meta(step)
    differences = differing_fields(meta["model"], config.model.to_dict())
    if differences:
      raise ValueError(f"--checkpoint {str(workdir)!r}: its checkpoint (step {step}) is of another "
                       f"model than its config.yaml; differing fields: "
                       f"{'; '.join('model.' + d for d in differences)}")
    one_device = dataclasses.replace(config, mesh=MeshConfig(data=1))  # generation: one device
    trainer = Trainer.build(one_device, devices=jax.local_devices()[:1])
    target = trainer.abstract_state()
    if meta.get("params_only"):  # written by `mla-jax convert`
      params = checkpoints.restore_params(step, target.params)
    else:
      params = checkpoints.restore(step, target).params
  finally:
    checkpoints.close()
  return config, params, step


def load_trained(workdir: str | Path) -> tuple[Config, Any]:
  """(config, params) of load_checkpoint."""
  config, params, _ = load_checkpoint(workdir)
  return config, params
