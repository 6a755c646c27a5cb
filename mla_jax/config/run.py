"""The run config: the train, data and mesh sections, the whole file (Config), and the run id
that names a workdir after the fields that define its checkpoints."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping, Optional

from mla_jax.config.fields import _check_fields, _check_type, _fail, _positive
from mla_jax.config.model import ModelConfig

REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
# The attention paths a train step may take (the differentiable ones of layers.masking.ATTN_IMPLS).
TRAIN_ATTN_IMPLS = ("auto", "naive", "flash_attention")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, evaluation, checkpointing and logging of `mla-jax train`."""

  steps: int = 1000
  batch_size: int = 16  # sequences per step, over all devices
  seq_len: int = 128
  learning_rate: float = 3e-3  # peak, after linear warmup; cosine decay to min_learning_rate
  min_learning_rate: float = 3e-4
  warmup_steps: Optional[int] = None  # null: min(100, steps // 10), so short runs need no edit
  weight_decay: float = 0.1  # AdamW, on matrices only (not norms)
  beta1: float = 0.9
  beta2: float = 0.95
  grad_clip: float = 1.0  # global norm
  max_nonfinite_steps: int = 5  # stop with an error after this many skipped updates in a row
  log_every: int = 10
  eval_every: int = 200
  eval_batches: int = 8
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  sample_prompt: str = "def "
  sample_tokens: int = 200  # printed after training; 0 for none
  sample_temperature: float = 0.8
  # Rematerialisation of each decoder block in the backward pass (jax.checkpoint policies):
  # none keeps every activation; full keeps only each block's input; dots_saveable keeps the
  # matmul outputs and recomputes the rest.
  remat: str = "none"
  # A workdir whose latest parameters start this run (from `mla-jax convert-to-mla`, or another
  # run of the same model) instead of a random init; the optimizer starts fresh. null: random.
  init_from: Optional[str] = None
  # The attention path of the train step (layers/masking.py): auto runs flash attention (blocked,
  # memory linear in seq_len) from FLASH_ATTENTION_MIN_TOKENS tokens on and the naive path
  # (the [B,H,T,T] scores kept for the backward pass) below; flash_attention or naive force one.
  attn_impl: str = "auto"
  # lambda of DeepSeek-V3's multi-token-prediction loss: loss = next-token CE + lambda / D x the
  # sum of the D depths' CEs (model.num_mtp_layers = D; unused without MTP modules). The V3
  # report trains with 0.3, then 0.1 for its last 4.8T tokens.
  mtp_loss_weight: float = 0.3

  def __post_init__(self):
    _check_fields(self, "train.")
    for name in ("steps", "batch_size", "seq_len", "learning_rate", "grad_clip",
                 "max_nonfinite_steps", "log_every", "eval_every", "eval_batches",
                 "checkpoint_every", "keep_checkpoints"):
      _positive(f"train.{name}", getattr(self, name))
    if not 0 <= self.min_learning_rate <= self.learning_rate:
      _fail("train.min_learning_rate", self.min_learning_rate,
            f"must be in [0, learning_rate={self.learning_rate}]")
    if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
      _fail("train.warmup_steps", self.warmup_steps,
            f"must be in [0, steps={self.steps}), or null for min(100, steps // 10)")
    if self.weight_decay < 0:
      _fail("train.weight_decay", self.weight_decay, "must be >= 0")
    for name in ("beta1", "beta2"):
      if not 0 <= getattr(self, name) < 1:
        _fail(f"train.{name}", getattr(self, name), "must be in [0, 1)")
    if self.sample_tokens < 0:
      _fail("train.sample_tokens", self.sample_tokens, "must be >= 0")
    if self.sample_temperature < 0:
      _fail("train.sample_temperature", self.sample_temperature, "must be >= 0 (0 = greedy)")
    if self.remat not in REMAT_POLICIES:
      _fail("train.remat", self.remat, f"allowed: {', '.join(REMAT_POLICIES)}")
    if self.init_from is not None and not self.init_from.strip():
      _fail("train.init_from", self.init_from, "must be a workdir path, or null")
    if self.attn_impl not in TRAIN_ATTN_IMPLS:
      _fail("train.attn_impl", self.attn_impl, f"allowed: {', '.join(TRAIN_ATTN_IMPLS)}")
    if self.mtp_loss_weight < 0:
      _fail("train.mtp_loss_weight", self.mtp_loss_weight, "must be >= 0 (0: the MTP modules "
            "get no gradient)")

  @property
  def warmup(self) -> int:
    """Linear warmup steps: warmup_steps, or min(100, steps // 10) when it is null."""
    return min(100, self.steps // 10) if self.warmup_steps is None else self.warmup_steps


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training text. path=None trains on this Python's standard library sources (no download)."""

  path: Optional[str] = None  # a file, a directory (all files below it) or a glob
  val_fraction: float = 0.05  # share of files (or of the bytes of a single file) held out

  def __post_init__(self):
    _check_fields(self, "data.")
    if self.path is not None and not self.path.strip():
      _fail("data.path", self.path, "must be a file, directory or glob, or null for the default")
    if not 0 < self.val_fraction < 1:
      _fail("data.val_fraction", self.val_fraction, "must be in (0, 1)")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh sizes (see mla_jax/sharding.py); -1 takes the remaining devices."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  sequence: int = 1

  def __post_init__(self):
    _check_fields(self, "mesh.")
    for f in dataclasses.fields(self):
      size = getattr(self, f.name)
      if size == 0 or size < -1:
        _fail(f"mesh.{f.name}", size, "must be a positive device count, or -1 for the rest")
    if sum(getattr(self, f.name) == -1 for f in dataclasses.fields(self)) > 1:
      _fail("mesh", dataclasses.asdict(self), "at most one axis may be -1")

  def sizes(self) -> dict[str, int]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Config:
  """The whole YAML file: top-level workdir and seed, and one section per concern.

  workdir=None (the default) is resolved by load_config to runs/<config name>-<run_id>: the
  config file's stem (tiny for the built-in defaults) and a hash of the fields that define what
  a checkpoint holds (run_fields), so unrelated runs never share a directory and the same run
  always finds its own.
  """

  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  workdir: Optional[str] = None
  seed: int = 0

  def __post_init__(self):
    for name, cls in _SECTIONS.items():
      if not isinstance(getattr(self, name), cls):
        _fail(name, getattr(self, name), f"expected a {cls.__name__}")
    _check_type("workdir", self.workdir, Optional[str])
    _check_type("seed", self.seed, int)
    if self.workdir is not None and not self.workdir.strip():
      _fail("workdir", self.workdir, "must be a directory path, or null for runs/<name>-<run id>")
    if self.train.seq_len > self.model.max_seq_len:
      _fail("train.seq_len", self.train.seq_len, f"must be <= model.max_seq_len "
            f"({self.model.max_seq_len})")

  def to_dict(self) -> dict[str, Any]:
    return {"model": self.model.to_dict(), "train": dataclasses.asdict(self.train),
            "data": dataclasses.asdict(self.data), "mesh": dataclasses.asdict(self.mesh),
            "workdir": self.workdir, "seed": self.seed}

  def run_fields(self) -> dict[str, Any]:
    """The fields that define what a checkpoint of this run holds: the model (less how it is
    executed: moe_impl, cache_dtype, the decode_* and flash_block_* fields), the data, the seed
    and the optimisation (warmup resolved; the starting workdir, train.init_from, when set;
    mtp_loss_weight when the model has MTP modules). Logging, evaluation, checkpoint cadence,
    sampling, the mesh and the workdir may change when a run resumes; these may not."""
    train = {name: getattr(self.train, name) for name in _RUN_TRAIN_FIELDS}
    train["warmup_steps"] = self.train.warmup
    if self.train.init_from is not None:  # only when set: runs from a random init keep their ids
      train["init_from"] = self.train.init_from
    if self.model.num_mtp_layers:  # only then does it change what is trained
      train["mtp_loss_weight"] = self.train.mtp_loss_weight
    model = {k: v for k, v in self.model.to_dict().items() if k not in _EXECUTION_MODEL_FIELDS}
    return {"model": model, "train": train, "data": dataclasses.asdict(self.data),
            "seed": self.seed}

  def run_id(self) -> str:
    """8 hex digits of SHA-256 over run_fields: equal runs, equal ids."""
    text = json.dumps(self.run_fields(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]

  def with_default_workdir(self, name: str) -> "Config":
    """This config, with workdir=None resolved to runs/<name>-<run_id>."""
    if self.workdir is not None:
      return self
    return dataclasses.replace(self, workdir=f"runs/{name}-{self.run_id()}")


# How a model is executed, not what its parameters are: the same checkpoint serves any of these.
_EXECUTION_MODEL_FIELDS = ("moe_impl", "cache_dtype", "decode_block_size", "decode_kernel",
                           "decode_kernel_block_size", "decode_kv_splits", "flash_block_q",
                           "flash_block_k")
_RUN_TRAIN_FIELDS = ("steps", "batch_size", "seq_len", "learning_rate", "min_learning_rate",
                     "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip")
_SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig, "mesh": MeshConfig}


def differing_fields(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
  """Dotted names of the keys whose values differ between two nested mappings."""
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out += differing_fields(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key}: {a!r} -> {b!r}")
  return out
