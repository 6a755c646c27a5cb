"""`mla-jax train`: next-token training with optax AdamW, orbax checkpoints and automatic resume.

Order of work: validate everything that can be wrong (config, devices, data, workdir) before the
first array is built; then init or restore; then the loop. Batches are a function of (seed, step),
so the checkpointed step is the whole data position, and a resumed run repeats an unbroken one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import signal
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

from mla_jax.checkpoint import Checkpoints
from mla_jax.config import (Config, MeshConfig, TrainConfig, config_from_dict,
                             differing_fields)
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
      init_value=0.0, peak_value=tc.learning_rate, warmup_steps=tc.warmup_steps,
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

  def train_step(self, state: TrainState, inputs: jax.Array, targets: jax.Array):
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


def check_workdir(config: Config, checkpoints: Checkpoints) -> Optional[int]:
  """The step to resume from, or None; refuses a checkpoint of a different model."""
  step = checkpoints.latest_step()
  if step is None:
    return None
  saved = checkpoints.read_meta(step)["model"]
  differences = differing_fields(saved, config.model.to_dict())
  if differences:
    raise ValueError(f"workdir {config.workdir!r} holds a checkpoint (step {step}) of a different "
                     f"model; differing fields: {'; '.join('model.' + d for d in differences)}. "
                     "Use another workdir, or the checkpoint's model config.")
  return step


class _StopRequests:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then saves and exits)."""

  def __init__(self):
    self.signal: Optional[str] = None
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class _Progress:
  """Progress bar on a terminal (a plain line every 10 log intervals in logs), tokens/s, and
  the metrics records: the loop only reports what happened."""

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
    if self.enabled and not self.interactive and step % (10 * self.tc.log_every) == 0:
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


def train(config: Config, log: Callable[[str], None] = print, progress: bool = True) -> dict:
  """Trains (or resumes) per config; returns a summary: final params, losses, steps."""
  tc = config.train
  check_inputs(config)
  trainer = Trainer.build(config)  # validates mesh, batch split and sharded dimensions
  corpus = load_corpus(config.data, min_tokens=tc.seq_len + 1)
  main_process = jax.process_index() == 0  # only process 0 logs and writes files besides orbax's
  if not main_process:
    log, progress = (lambda _: None), False
  workdir = Path(config.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoints = Checkpoints(workdir, tc.keep_checkpoints)
  resume_step = check_workdir(config, checkpoints)
  if main_process:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

  if resume_step is None:
    state = trainer.init_state()
  else:
    state = checkpoints.restore(resume_step, trainer.abstract_state())
    log(f"resumed from {checkpoints.directory / str(resume_step)} (step {resume_step})")
  start = int(state.step)
  mesh = " x ".join(f"{axis}={size}" for axis, size in trainer.mesh.shape.items())
  log(f"data: {corpus.source}: {corpus.num_files} files, {len(corpus.train):,} train / "
      f"{len(corpus.val):,} validation tokens; {jax.device_count()} device(s) in "
      f"{jax.process_count()} process(es), mesh {mesh}")
  log(f"unigram entropy of the validation tokens: {unigram_entropy(corpus.val):.4f} nats/token "
      "(the loss of a model that ignores context)")
  meta = lambda step: {"model": config.model.to_dict(), "step": step,  # noqa: E731
                       "data_position": {"seed": config.seed, "next_batch": step}}
  metrics_log = MetricsLog(workdir, resume_step=start) if main_process else None
  report = _Progress(config, start, metrics_log, log, progress)
  interrupted, previous = None, None

  def stop_if_diverged(step_and_metrics) -> None:
    if step_and_metrics is None:
      return
    step, metrics = step_and_metrics
    if int(metrics["nonfinite_in_a_row"]) >= tc.max_nonfinite_steps:
      raise TrainingError(
          f"{tc.max_nonfinite_steps} non-finite updates in a row (step {step}); stopped. The "
          f"last checkpoint (step {checkpoints.latest_step()}) holds finite parameters; lower "
          "train.learning_rate or check the data.")

  try:
    with _StopRequests() as stop:
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
        if stop.signal is not None:
          checkpoints.save(step, state, meta(step), wait=True)
          interrupted = stop.signal
          log(f"{stop.signal}: saved step {step} to {checkpoints.directory}; run the same command "
              "to resume")
          break
        if step % tc.checkpoint_every == 0 or step == tc.steps:
          checkpoints.save(step, state, meta(step))
      stop_if_diverged(previous)
  finally:  # also on errors: finish pending async saves so no checkpoint is left half-written
    report.close()
    checkpoints.close()

  if main_process and interrupted is None and (workdir / "metrics.jsonl").exists():
    log(f"wrote {plot_losses(workdir)}")
  return {**report.latest, "start_step": start, "final_step": int(state.step),
          "interrupted": interrupted, "params": state.params, "main_process": main_process,
          "multi_process": jax.process_count() > 1}


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
  if not path.is_file():
    raise ValueError(f"--checkpoint {str(workdir)!r} is not a training workdir: no config.yaml")
  return config_from_dict(yaml.safe_load(path.read_text()))


def load_trained(workdir: str | Path) -> tuple[Config, Any]:
  """(config, params) of the latest checkpoint in a `mla-jax train` workdir; clear errors for a
  directory that is not one, or whose checkpoint does not match its config.yaml."""
  config = read_workdir_config(workdir)
  if not (Path(workdir) / "checkpoints").is_dir():
    raise ValueError(f"--checkpoint {str(workdir)!r} has no checkpoints/ directory")
  checkpoints = Checkpoints(workdir, config.train.keep_checkpoints)
  try:
    step = checkpoints.latest_step()
    if step is None:
      raise ValueError(f"--checkpoint {str(workdir)!r} holds no complete checkpoint")
    check_workdir(config, checkpoints)
    one_device = dataclasses.replace(config, mesh=MeshConfig(data=1))  # generation: one device
    trainer = Trainer.build(one_device, devices=jax.local_devices()[:1])
    target = trainer.abstract_state()
    if checkpoints.read_meta(step).get("params_only"):  # written by `mla-jax convert`
      params = checkpoints.restore_params(step, target.params)
    else:
      params = checkpoints.restore(step, target).params
  finally:
    checkpoints.close()
  return config, params
