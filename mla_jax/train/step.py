"""The train step: the optimizer, the loss, and the Trainer that jits them over a mesh.

Parameters and optimizer state live in one TrainState; an update whose gradient is non-finite is
skipped and counted (optax.apply_if_finite), so a run can stop with its last checkpoint intact
(docs/training.md).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mla_jax.config.run import Config, TrainConfig
from mla_jax.layers.params import unbox
from mla_jax.model import Transformer, output_logits, transformer_hidden
from mla_jax.mtp import mtp_forward
from mla_jax.sharding import batch_sharding, make_mesh, tree_shardings
from mla_jax.train.data import VAL_STREAM, Corpus, batch_at

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


DEFAULT_MTP_LOSS_WEIGHT = TrainConfig.mtp_loss_weight


def loss_terms(model: Transformer, params, inputs: jax.Array, targets: jax.Array,
               with_aux: bool = True, mtp_loss_weight: float = DEFAULT_MTP_LOSS_WEIGHT,
               attn_impl: str = "auto") -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, its parts) for inputs, targets [B,T]: the mean next-token cross-entropy in nats; with
  model.num_mtp_layers = D > 0, plus mtp_loss_weight / D x the sum of the D MTP depths' mean
  cross-entropies (DeepSeek-V3 report, eq. 25; depth k scored on targets[:, k:], mla_jax/mtp.py);
  plus DeepSeekMoE's expert-balance loss when with_aux and model.aux_loss_alpha > 0.

  The parts (float32 scalars) are empty without MTP modules; with them: main_loss (the
  next-token cross-entropy), and per depth k = 1..D mtp_loss_k and mtp_accuracy_k (the share of
  positions whose most likely token is the target). attn_impl: the attention path
  (train.attn_impl)."""
  cfg = model.config
  params = unbox(params)
  hidden, _, aux = transformer_hidden(cfg, params, inputs, remat=model.remat,
                                      attn_impl=attn_impl)  # [B,T,D]
  logits = output_logits(cfg, params, hidden)  # [B,T,V]
  main = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  loss, terms = main, {}
  if cfg.num_mtp_layers:
    depths, mtp_aux = mtp_forward(cfg, params, hidden, inputs, remat=model.remat,
                                  attn_impl=attn_impl)
    aux = aux + mtp_aux
    for k, depth_logits in enumerate(depths, start=1):  # [B,T-k,V] for targets[:, k:]
      terms[f"mtp_loss_{k}"] = optax.softmax_cross_entropy_with_integer_labels(
          depth_logits, targets[:, k:]).mean()
      terms[f"mtp_accuracy_{k}"] = jnp.mean(jnp.argmax(depth_logits, axis=-1) == targets[:, k:])
    loss = main + mtp_loss_weight / cfg.num_mtp_layers * sum(
        terms[f"mtp_loss_{k}"] for k in range(1, cfg.num_mtp_layers + 1))
    terms["main_loss"] = main
  if with_aux and cfg.aux_loss_alpha > 0 and cfg.n_routed_experts is not None:
    loss = loss + aux
  return loss, terms


def loss_fn(model: Transformer, params, inputs: jax.Array, targets: jax.Array,
            with_aux: bool = True, mtp_loss_weight: float = DEFAULT_MTP_LOSS_WEIGHT,
            attn_impl: str = "auto") -> jax.Array:
  """The training loss alone (loss_terms' first value): mean next-token cross-entropy in nats
  (inputs, targets [B,T]), the MTP depths' weighted cross-entropies with MTP modules, and
  DeepSeekMoE's expert balance loss when with_aux and model.aux_loss_alpha > 0 (evaluation
  reports the plain one). attn_impl: the attention path (train.attn_impl)."""
  return loss_terms(model, params, inputs, targets, with_aux, mtp_loss_weight, attn_impl)[0]


def compute_grads(model: Transformer, params, inputs, targets, attn_impl: str = "auto",
                  mtp_loss_weight: float = DEFAULT_MTP_LOSS_WEIGHT
                  ) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
  """(loss, gradients of params, loss_terms' parts); attn_impl: train.attn_impl."""
  (loss, terms), grads = jax.value_and_grad(
      lambda p: loss_terms(model, p, inputs, targets, mtp_loss_weight=mtp_loss_weight,
                           attn_impl=attn_impl),
      has_aux=True)(params)
  return loss, grads, terms


def apply_gradients(optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    state: TrainState, loss: jax.Array, grads,
                    terms: Optional[dict] = None) -> tuple[TrainState, dict]:
  """One optimizer update; a non-finite gradient leaves params and moments unchanged. The
  metrics hold the loss, its parts (`terms`, from compute_grads) and the update's figures."""
  applied_before = state.step - state.opt_state.total_notfinite  # the schedule's own count
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
             "learning_rate": schedule(applied_before),
             "nonfinite_in_a_row": opt_state.notfinite_count,
             "skipped_updates": opt_state.total_notfinite, **(terms or {})}
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

  def state_from_params(self, params) -> TrainState:
    """Step 0 with the given parameters (train.init_from, restored into abstract_state's params:
    already placed) and a fresh optimizer state, sharded as init_state shards its own."""
    start = lambda p: TrainState(step=jnp.int32(0), params=p,  # noqa: E731
                                 opt_state=self.optimizer.init(p))
    return jax.jit(start, out_shardings=self.state_shardings)(params)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state: a restore target that allocates nothing."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        self._state_shapes, self.state_shardings)

  @functools.cached_property
  def _train_step(self) -> Callable:
    def step(state, inputs, targets):
      loss, grads, terms = compute_grads(self.model, state.params, inputs, targets,
                                         self.config.train.attn_impl,
                                         self.config.train.mtp_loss_weight)
      return apply_gradients(self.optimizer, self.schedule, state, loss, grads, terms)

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

    def eval_step(params, x, y):  # (the next-token cross-entropy, the MTP depths' parts)
      loss, terms = loss_terms(self.model, params, x, y, with_aux=False,
                               attn_impl=self.config.train.attn_impl)
      return terms.pop("main_loss", loss), terms

    return jax.jit(eval_step, in_shardings=(self.state_shardings.params, batch, batch),
                   out_shardings=self.replicated)

  def put_batch(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Global [B,T] arrays from host numpy: each process places only its own devices' rows."""
    sharding = batch_sharding(self.mesh)
    return tuple(jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
                 for x in (inputs, targets))

  def evaluate(self, params, corpus: Corpus) -> float:
    """The mean next-token cross-entropy over train.eval_batches validation batches."""
    return self.evaluate_terms(params, corpus)[0]

  def evaluate_terms(self, params, corpus: Corpus) -> tuple[float, dict[str, float]]:
    """(evaluate's loss, the means of loss_terms' parts over the same batches: the MTP depths'
    cross-entropies and accuracies; empty without MTP modules). The loss is the next-token
    cross-entropy alone, never weighted with the MTP terms: runs with and without MTP compare."""
    tc = self.config.train
    with jax.set_mesh(self.mesh):
      results = [self._eval_step(params, *self.put_batch(*batch_at(
          corpus.val, self.config.seed, VAL_STREAM, i, tc.batch_size, tc.seq_len)))
                 for i in range(tc.eval_batches)]
    results = jax.device_get(results)
    terms = {name: float(np.mean([r[1][name] for r in results])) for name in results[0][1]}
    return float(np.mean([r[0] for r in results])), terms
