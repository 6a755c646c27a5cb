"""Frozen, validated configuration dataclasses and their YAML loader.

Field names follow DeepSeek's / Hugging Face's config.json, so a user reading a DeepSeek checkpoint's
config knows what to type. Every check raises ValueError naming the field, the value and what is
allowed, before any array is created.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import typing
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

ATTENTION_KINDS = ("mla", "mha", "gqa", "mqa")
PRESETS_DIR = Path(__file__).resolve().parent / "configs"  # installed wheel: package data
if not PRESETS_DIR.is_dir():  # a source checkout (editable install): the repository's configs/
  PRESETS_DIR = Path(__file__).resolve().parents[1] / "configs"


class _Loader(yaml.SafeLoader):
  """YAML with YAML 1.2's numbers: `1e-3`, `3E-4` and `.5` are floats, as a user means them
  (PyYAML's YAML 1.1 resolver reads an exponent without a dot as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
  """YAML text -> Python values, numbers in every common notation (1e-3, 3E-4, 0.001, 1_000)."""
  return yaml.load(text, Loader=_Loader)

DTYPES = ("float32", "bfloat16", "float16")
MOE_IMPLS = ("dispatch", "dense")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
CACHE_DTYPES = ("float32", "bfloat16", "int8", "int4")  # model.cache_dtype; null = model.dtype


def _fail(field: str, value: Any, allowed: str) -> None:
  raise ValueError(f"{field}={value!r} is invalid: {allowed}")


def _did_you_mean(name: str, candidates: list[str]) -> str:
  """' (did you mean 'a' or 'b'?)' for the close candidates (difflib), else ''."""
  close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
  return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _check_type(field: str, value: Any, annotation: Any) -> Any:
  """Checks one YAML/Python value against a field's annotation; returns it (ints widen to float,
  integral floats such as 1e3 narrow to int)."""
  optional = typing.get_origin(annotation) is typing.Union
  if optional:
    if value is None:
      return None
    annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
  if annotation is bool:
    if not isinstance(value, bool):
      _fail(field, value, "expected true or false")
    return value
  if annotation is int:
    if isinstance(value, float) and value.is_integer():  # 1e3 and 2E4 are integers written short
      return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
      _fail(field, value, "expected an integer" + (" or null" if optional else ""))
    return value
  if annotation is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      _fail(field, value, "expected a number" + (" or null" if optional else ""))
    return float(value)
  if annotation is str:
    if not isinstance(value, str):
      _fail(field, value, "expected a string")
    return value
  return value  # nested sections are checked by their own dataclass


def _check_fields(obj: Any, prefix: str) -> None:
  """Type-checks every field of a frozen dataclass in place (used from __post_init__)."""
  hints = typing.get_type_hints(type(obj))
  for f in dataclasses.fields(obj):
    value = _check_type(f"{prefix}{f.name}", getattr(obj, f.name), hints[f.name])
    object.__setattr__(obj, f.name, value)


def _positive(field: str, value: Optional[float], optional: bool = False) -> None:
  if value is None and optional:
    return
  if value is None or value <= 0:
    _fail(field, value, "must be > 0" + (" or null" if optional else ""))


@dataclasses.dataclass(frozen=True)
class YarnScaling:
  """YaRN context extension, as in DeepSeek-V2/V3's `rope_scaling` mapping (type "yarn")."""

  factor: float
  original_max_position_embeddings: int
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 0.0

  def __post_init__(self):
    _check_fields(self, "model.rope_scaling.")
    p = "model.rope_scaling."
    if self.factor < 1.0:
      _fail(p + "factor", self.factor, "must be >= 1 (1 = no extension)")
    _positive(p + "original_max_position_embeddings", self.original_max_position_embeddings)
    _positive(p + "beta_slow", self.beta_slow)
    if self.beta_fast <= self.beta_slow:
      _fail(p + "beta_fast", self.beta_fast, f"must be > beta_slow ({self.beta_slow})")
    if self.mscale < 0:
      _fail(p + "mscale", self.mscale, "must be >= 0")
    if self.mscale_all_dim < 0:
      _fail(p + "mscale_all_dim", self.mscale_all_dim, "must be >= 0 (0 = no softmax rescaling)")

  @classmethod
  def from_mapping(cls, mapping: Mapping[str, Any]) -> "YarnScaling":
    """Accepts a DeepSeek/HF rope_scaling dict; its `type`/`rope_type` must say yarn."""
    values = dict(mapping)
    kind = values.pop("type", values.pop("rope_type", "yarn"))
    if kind != "yarn":
      _fail("model.rope_scaling.type", kind, "only 'yarn' is supported")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
      if key not in names:
        _fail(f"model.rope_scaling.{key}", values[key], f"unknown key; allowed: {sorted(names)}")
    for required in ("factor", "original_max_position_embeddings"):
      if required not in values:
        _fail(f"model.rope_scaling.{required}", None, "is required for yarn")
    return cls(**values)

  def softmax_mscale(self) -> float:
    """mscale applied to the softmax scale, squared (DeepSeek's `mscale_all_dim`)."""
    return yarn_get_mscale(self.factor, self.mscale_all_dim) ** 2

  def attention_factor(self) -> float:
    """Factor on cos/sin, so on q_rope . k_rope it acts squared."""
    return yarn_get_mscale(self.factor, self.mscale) / yarn_get_mscale(self.factor, self.mscale_all_dim)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
  """DeepSeek's YaRN magnitude correction: 0.1 * mscale * ln(scale) + 1 (1 when not extending)."""
  if scale <= 1.0:
    return 1.0
  return 0.1 * mscale * math.log(scale) + 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a decoder-only MLA (or MHA/GQA/MQA baseline) Transformer LM.

  Letters used in shape comments: D hidden_size, H num_heads, G num_kv_heads, Q q_lora_rank,
  C kv_lora_rank, N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, I intermediate_size.
  The baselines use per-head keys of N + R (RoPE on the last R) and values of V, so comparisons
  with MLA change only the attention and its cache.
  """

  vocab_size: int = 260
  hidden_size: int = 128
  num_layers: int = 4
  num_heads: int = 4
  q_lora_rank: Optional[int] = 64
  kv_lora_rank: int = 32
  qk_nope_head_dim: int = 32
  qk_rope_head_dim: int = 16
  v_head_dim: int = 32
  intermediate_size: int = 384
  rope_theta: float = 10000.0
  rope_scaling: Optional[Any] = None  # None, a YarnScaling, or a mapping converted to one
  rope_interleave: bool = True
  rms_norm_eps: float = 1e-6  # the block and final norms (input_, post_attention_layernorm, norm)
  # The latent norms' epsilon (q_a_layernorm, kv_a_layernorm). DeepSeek's reference code builds
  # them without an epsilon argument, so 1e-6 whatever rms_norm_eps says, and transformers does
  # the same; presets and imported checkpoints keep 1e-6.
  latent_norm_eps: float = 1e-6
  max_seq_len: int = 256
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention: str = "mla"
  num_kv_heads: Optional[int] = None  # baselines only; None = H for mha, 1 for mqa
  initializer_range: float = 0.02
  # DeepSeekMoE (n_routed_experts=None: every layer is a dense SwiGLU MLP).
  n_routed_experts: Optional[int] = None
  num_experts_per_tok: int = 2
  n_shared_experts: int = 0
  moe_intermediate_size: int = 64
  first_k_dense_replace: int = 0  # the first k layers stay dense
  scoring_func: str = "softmax"  # DeepSeek-V2: softmax; V3: sigmoid
  topk_method: str = "greedy"  # greedy | group_limited_greedy (V2) | noaux_tc (V3)
  n_group: int = 1
  topk_group: int = 1
  norm_topk_prob: bool = False
  routed_scaling_factor: float = 1.0
  aux_loss_alpha: float = 0.0  # expert-level balance loss weight in training
  moe_impl: str = "dispatch"  # dispatch (grouped matmul, FLOPs follow K) | dense (reference)
  # Run the repeated blocks (after the first_k_dense_replace dense ones) as one nn.scan over
  # parameters stacked on a leading `layers` axis: compile time stops growing with depth. The
  # parameter layout differs (mla_jax.model.stack_layers / unstack_layers convert); a decode
  # step pays a copy of the cache per step under scan, so inference keeps it off.
  scan_layers: bool = False
  # Decode cache: how its values are stored (null = dtype), and the flash-decoding block size in
  # cache slots (layers/flash_decode.py; 256 measured best on a 2-core CPU, see README).
  cache_dtype: Optional[str] = None
  decode_block_size: int = 512

  def __post_init__(self):
    _check_fields(self, "model.")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "kv_lora_rank",
                 "qk_nope_head_dim", "v_head_dim", "intermediate_size", "max_seq_len",
                 "rope_theta", "rms_norm_eps", "latent_norm_eps", "initializer_range"):
      _positive(f"model.{name}", getattr(self, name))
    _positive("model.q_lora_rank", self.q_lora_rank, optional=True)
    if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
      _fail("model.qk_rope_head_dim", self.qk_rope_head_dim, "must be a positive even number")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        _fail(f"model.{name}", getattr(self, name), f"allowed: {', '.join(DTYPES)}")
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, YarnScaling):
      if not isinstance(self.rope_scaling, Mapping):
        _fail("model.rope_scaling", self.rope_scaling, "expected null or a yarn mapping")
      object.__setattr__(self, "rope_scaling", YarnScaling.from_mapping(self.rope_scaling))
    self._check_attention()
    self._check_moe()
    if self.cache_dtype is not None and self.cache_dtype not in CACHE_DTYPES:
      _fail("model.cache_dtype", self.cache_dtype,
            f"allowed: {', '.join(CACHE_DTYPES)}, or null for model.dtype")
    if self.cache_dtype in ("int8", "int4") and self.attention != "mla":
      _fail("model.cache_dtype", self.cache_dtype, "int8/int4 quantize MLA's latent: use "
            f"float32 or bfloat16 with attention={self.attention}")
    if self.cache_dtype == "int4" and self.kv_lora_rank % 2:
      _fail("model.cache_dtype", self.cache_dtype,
            f"int4 packs two values per byte: needs an even kv_lora_rank, not {self.kv_lora_rank}")
    _positive("model.decode_block_size", self.decode_block_size)

  def _check_moe(self) -> None:
    if self.moe_impl not in MOE_IMPLS:
      _fail("model.moe_impl", self.moe_impl, f"allowed: {', '.join(MOE_IMPLS)}")
    e = self.n_routed_experts
    if e is None:
      return
    _positive("model.n_routed_experts", e)
    if not 1 <= self.num_experts_per_tok <= e:
      _fail("model.num_experts_per_tok", self.num_experts_per_tok,
            f"must be in [1, n_routed_experts={e}]")
    if self.n_shared_experts < 0:
      _fail("model.n_shared_experts", self.n_shared_experts, "must be >= 0")
    _positive("model.moe_intermediate_size", self.moe_intermediate_size)
    if not 0 <= self.first_k_dense_replace <= self.num_layers:
      _fail("model.first_k_dense_replace", self.first_k_dense_replace,
            f"must be in [0, num_layers={self.num_layers}]")
    if self.scoring_func not in ("softmax", "sigmoid"):
      _fail("model.scoring_func", self.scoring_func, "allowed: softmax, sigmoid")
    methods = {"softmax": ("greedy", "group_limited_greedy"), "sigmoid": ("noaux_tc",)}
    if self.topk_method not in methods[self.scoring_func]:
      _fail("model.topk_method", self.topk_method,
            f"with scoring_func={self.scoring_func} allowed: {', '.join(methods[self.scoring_func])}")
    if self.n_group <= 0 or e % self.n_group:
      _fail("model.n_group", self.n_group, f"must be a positive divisor of n_routed_experts={e}")
    if self.topk_method == "noaux_tc" and e // self.n_group < 2:
      _fail("model.n_group", self.n_group, f"with topk_method=noaux_tc a group's score is the sum "
            f"of its top-2 experts, so each group needs >= 2 of the n_routed_experts={e}: "
            f"n_group must be <= {e // 2}")
    if not 1 <= self.topk_group <= self.n_group:
      _fail("model.topk_group", self.topk_group, f"must be in [1, n_group={self.n_group}]")
    if self.topk_group * (e // self.n_group) < self.num_experts_per_tok:
      _fail("model.topk_group", self.topk_group, "the chosen groups hold fewer experts than "
            f"num_experts_per_tok={self.num_experts_per_tok}")
    if self.routed_scaling_factor <= 0:
      _fail("model.routed_scaling_factor", self.routed_scaling_factor, "must be > 0")
    if self.aux_loss_alpha < 0:
      _fail("model.aux_loss_alpha", self.aux_loss_alpha, "must be >= 0")

  def is_moe_layer(self, layer: int) -> bool:
    return self.n_routed_experts is not None and layer >= self.first_k_dense_replace

  def _check_attention(self) -> None:
    if self.attention not in ATTENTION_KINDS:
      _fail("model.attention", self.attention, f"allowed: {', '.join(ATTENTION_KINDS)}")
    g, h = self.num_kv_heads, self.num_heads
    if self.attention == "mla":
      if g is not None:
        _fail("model.num_kv_heads", g, "must be null for attention=mla (MLA caches one latent)")
    elif self.attention == "mha":
      if g is not None and g != h:
        _fail("model.num_kv_heads", g, f"must equal num_heads ({h}) for mha, or be null")
    elif self.attention == "mqa":
      if g is not None and g != 1:
        _fail("model.num_kv_heads", g, "must be 1 for mqa, or null")
    else:  # gqa
      if g is None or not 1 < g < h or h % g:
        _fail("model.num_kv_heads", g, f"gqa needs 1 < num_kv_heads < num_heads ({h}) dividing it")

  # Derived sizes, named once here so no module recomputes them differently.
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def kv_heads(self) -> int:
    """G: key/value heads of the baselines."""
    if self.num_kv_heads is not None:
      return self.num_kv_heads
    return 1 if self.attention == "mqa" else self.num_heads

  @property
  def kv_cache_dtype(self) -> str:
    """The decode cache's value dtype: cache_dtype, or dtype when it is null."""
    return self.dtype if self.cache_dtype is None else self.cache_dtype

  @property
  def softmax_scale(self) -> float:
    """(N + R) ** -0.5, times YaRN's mscale**2 when mscale_all_dim is set; both paths use it."""
    scale = self.qk_head_dim ** -0.5
    if self.rope_scaling is not None:
      scale *= self.rope_scaling.softmax_mscale()
    return scale

  def cache_elements_per_token_per_layer(self) -> int:
    """C + R for MLA; G * (N + R + V) for the baselines (keys carry RoPE on their last R)."""
    if self.attention == "mla":
      return self.kv_lora_rank + self.qk_rope_head_dim
    return self.kv_heads * (self.qk_head_dim + self.v_head_dim)

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    if self.rope_scaling is not None:
      out["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
    return out


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
    executed: moe_impl, cache_dtype, decode_block_size), the data, the seed and the optimisation
    (warmup resolved). Logging, evaluation, checkpoint cadence, sampling,
    the mesh and the workdir may change when a run resumes; these may not."""
    train = {name: getattr(self.train, name) for name in _RUN_TRAIN_FIELDS}
    train["warmup_steps"] = self.train.warmup
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
_EXECUTION_MODEL_FIELDS = ("moe_impl", "cache_dtype", "decode_block_size")
_RUN_TRAIN_FIELDS = ("steps", "batch_size", "seq_len", "learning_rate", "min_learning_rate",
                     "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip")
_SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig, "mesh": MeshConfig}
_SCALARS = ("workdir", "seed")  # top-level keys that are values, not sections
_MAPPING_FIELDS = {("model", "rope_scaling")}  # free-form mappings, checked by their own class
_KNOWN = sorted(list(_SECTIONS) + list(_SCALARS))
DEFAULT_NAME = "tiny"  # the built-in defaults are configs/tiny.yaml


def config_keys() -> list[str]:
  """Every dotted key an override may set, e.g. 'model.kv_lora_rank', 'seed'."""
  return list(_SCALARS) + [f"{section}.{f.name}" for section, cls in _SECTIONS.items()
                           for f in dataclasses.fields(cls)]


def _unknown_key(key: str, detail: str = "") -> ValueError:
  return ValueError(f"unknown config key {key!r}{detail}{_did_you_mean(key, config_keys())}")


def _parse_override(text: str) -> tuple[list[str], Any]:
  if "=" not in text:
    raise ValueError(f"override {text!r} is invalid: expected key=value, e.g. model.kv_lora_rank=64")
  key, raw = text.split("=", 1)
  path = key.strip().split(".")
  if not all(path):
    raise ValueError(f"override {text!r} is invalid: empty key part in {key!r}")
  try:
    return path, parse_yaml(raw) if raw.strip() else ""
  except yaml.YAMLError as err:
    raise ValueError(f"override {text!r} is invalid: its value is not YAML "
                     f"({_yaml_problem(err)}); write a number, true, false, null, [a, b] or a "
                     "quoted string") from None


def _apply_override(raw: dict[str, Any], path: list[str], value: Any) -> None:
  """Sets raw[a][b]... = value, refusing keys the config does not have."""
  top, key = path[0], ".".join(path)
  if top in _SCALARS:
    if len(path) > 1:
      raise ValueError(f"unknown config key {key!r}: {top} has no sub-keys")
    raw[top] = value
    return
  if top not in _SECTIONS:
    raise _unknown_key(key, f": top-level keys are {_KNOWN}")
  if len(path) == 1:
    raise ValueError(f"override {top!r} needs a field, e.g. {top}.<field>=value")
  names = {f.name for f in dataclasses.fields(_SECTIONS[top])}
  if path[1] not in names:
    raise _unknown_key(key)
  if len(path) > 2 and (top, path[1]) not in _MAPPING_FIELDS:
    raise ValueError(f"unknown config key {key!r}: {path[1]} has no sub-keys")
  node = raw.setdefault(top, {})
  if not isinstance(node, dict):
    raise ValueError(f"config section {top!r} must be a mapping, got {node!r}")
  for part in path[1:-1]:
    child = node.get(part)
    if not isinstance(child, dict):
      child = {}
      node[part] = child
    node = child
  node[path[-1]] = value


def config_from_dict(raw: Mapping[str, Any]) -> Config:
  """Builds a Config from nested dicts, naming any unknown key."""
  if not isinstance(raw, Mapping):
    raise ValueError(f"config must be a mapping of sections, got {type(raw).__name__}")
  values: dict[str, Any] = {}
  for name, section in raw.items():
    if name in _SCALARS:
      values[name] = section
      continue
    if name not in _SECTIONS:
      raise _unknown_key(name, f": top-level keys are {_KNOWN}")
    if not isinstance(section, Mapping):
      raise ValueError(f"config section {name!r} must be a mapping, got {section!r}")
    cls = _SECTIONS[name]
    names = {f.name for f in dataclasses.fields(cls)}
    for key in section:
      if key not in names:
        raise _unknown_key(f"{name}.{key}")
    values[name] = cls(**section)
  return Config(**values)


def _yaml_problem(err: yaml.YAMLError) -> str:
  """'found ... at line L column C' from a PyYAML error, without its multi-line excerpt."""
  mark = getattr(err, "problem_mark", None)
  problem = getattr(err, "problem", None) or type(err).__name__
  return problem if mark is None else f"{problem} at line {mark.line + 1} column {mark.column + 1}"


def read_yaml(path: Path) -> Any:
  """A YAML file's contents; a syntax error is a ValueError naming the file, line and column."""
  try:
    return parse_yaml(Path(path).read_text())
  except yaml.YAMLError as err:
    raise ValueError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(err)}; "
                     "fix that line") from None


def presets() -> list[str]:
  """Names of the configs shipped with the package (`mla-jax info deepseek_v2`)."""
  return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_config_path(text: str | Path) -> Path:
  """A config argument -> a YAML file: an existing path, else a preset by name (`tiny`,
  `tiny.yaml`, or `configs/tiny.yaml` from any directory). ValueError says what is there instead."""
  path = Path(text).expanduser()
  if path.is_file():
    return path
  if path.is_dir():
    inside = " (a training workdir: give its config.yaml)" if (path / "config.yaml").is_file() else ""
    raise ValueError(f"config {str(text)!r} is a directory{inside}; expected a YAML file or a "
                     f"preset name ({', '.join(presets())})")
  name = path.name[:-5] if path.name.endswith(".yaml") else path.name
  if path.parent in (Path("."), Path("configs")) and (PRESETS_DIR / f"{name}.yaml").is_file():
    return PRESETS_DIR / f"{name}.yaml"
  raise ValueError(f"config file {str(text)!r} does not exist, and no preset is called {name!r}"
                   f"{_did_you_mean(name, presets())}; presets: {', '.join(presets())}")


def load_config(path: Optional[str | Path], *overrides: str) -> Config:
  """Reads a YAML config (a path or a preset name; None: the built-in defaults) and applies
  dotted overrides such as 'model.kv_lora_rank=64'. workdir=None is resolved to
  runs/<file stem>-<run_id> (see Config)."""
  raw: Any = {}
  name = DEFAULT_NAME
  if path is not None:
    file = resolve_config_path(path)
    name = file.stem
    raw = read_yaml(file) or {}
    if not isinstance(raw, dict):
      raise ValueError(f"config file {str(path)!r} must hold a mapping of sections")
  for text in overrides:
    _apply_override(raw, *_parse_override(text))
  return config_from_dict(raw).with_default_workdir(name)


def load_config_args(items: list[str]) -> Config:
  """The command line's `[CONFIG] [key=value ...]`: CONFIG is optional, so a first item with
  '=' is already an override. A key given without '=' (`model.hidden_size 64`) is answered
  with the override that was probably meant."""
  keys = set(config_keys())
  for i, item in enumerate(items):
    if "=" not in item and (item in keys or item.split(".")[0] in _SECTIONS and "." in item):
      value = items[i + 1] if i + 1 < len(items) and "=" not in items[i + 1] else "VALUE"
      raise ValueError(f"{item!r} is a config key, not a file: did you mean {item}={value}?")
  if items and "=" not in items[0]:
    return load_config(items[0], *items[1:])
  return load_config(None, *items)


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
