"""The model schema: ModelConfig (and its YaRN section), what every layer reads.

Field names follow DeepSeek's / Hugging Face's config.json, so a user reading a DeepSeek
checkpoint's config knows what to type. Every check raises ValueError naming the field, the value
and what is allowed. This module imports no YAML and no training code, so a layer that needs the
schema pulls in nothing else.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

from mla_jax.config.fields import _check_fields, _fail, _positive

ATTENTION_KINDS = ("mla", "mha", "gqa", "mqa")
DTYPES = ("float32", "bfloat16", "float16")
MOE_IMPLS = ("dispatch", "dense")
CACHE_DTYPES = ("float32", "bfloat16", "int8", "int4")  # model.cache_dtype; null = model.dtype
DECODE_KERNELS = ("auto", "xla", "pallas")  # model.decode_kernel


def dtype_to_name(value: Any) -> Any:
  """A dtype object or type (jnp.bfloat16, np.dtype("float32"), np.float16) -> its name, so a
  config holds strings and serialises to YAML/JSON; strings, None and anything that is no dtype
  are returned as they are, for the field checks to name."""
  if value is None or isinstance(value, str):
    return value
  import numpy as np  # only here: a dtype object means NumPy (and ml_dtypes, via JAX) is loaded

  try:
    return np.dtype(value).name
  except TypeError:
    return value


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
  with MLA change only the attention and its cache. N may be 0 (every key feature rotated, as in
  Llama, Qwen2 and Mistral).
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
  # Baselines only: biases on the query, key and value projections (Qwen2's attention).
  qkv_bias: bool = False
  # MLA only: k_rope (and each head's q_rope) is this many groups of R / qk_rope_groups features,
  # every group rotated at the same frequencies, as if each were its own RoPE key. DeepSeek's MLA
  # has one (1); a model converted from GQA with every RoPE feature kept has one per kv head
  # (docs/conversion.md). Only 1 is expressible as a DeepSeek checkpoint.
  qk_rope_groups: int = 1
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
  # DeepSeek-V3's multi-token prediction (Hugging Face's num_nextn_predict_layers): D sequential
  # modules after the last layer, depth k predicting the token k + 1 ahead (mla_jax/mtp.py),
  # trained with train.mtp_loss_weight and used as the draft model of speculative decoding.
  num_mtp_layers: int = 0
  # Decode cache: how its values are stored (null = dtype), and the flash-decoding block size in
  # cache slots (layers/flash_decode.py): a tuning knob whose best value depends on the device,
  # see docs/decode.md.
  cache_dtype: Optional[str] = None
  decode_block_size: int = 512
  # MLA's decode attention (docs/decode.md): "pallas", the fused kernel (mla_jax/kernels; on CPU
  # run interpreted, for tests), "xla", the flash-decoding loop above, or "auto": pallas on TPU
  # and GPU, xla on CPU. The kernel's tokens per block (null: the platform's default) and
  # its programs per sequence (split-KV, for long contexts and small batches).
  decode_kernel: str = "auto"
  decode_kernel_block_size: Optional[int] = None
  decode_kv_splits: int = 1
  # Flash attention (training and prefill, layers/flash_attention.py): query rows and key slots
  # per block, tuning knobs chosen by measurement (docs/flash-attention.md).
  flash_block_q: int = 256
  flash_block_k: int = 256

  def __post_init__(self):
    for name in ("dtype", "param_dtype", "cache_dtype"):  # before the type check wants a str
      object.__setattr__(self, name, dtype_to_name(getattr(self, name)))
    _check_fields(self, "model.")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "kv_lora_rank",
                 "v_head_dim", "intermediate_size", "max_seq_len",
                 "rope_theta", "rms_norm_eps", "latent_norm_eps", "initializer_range"):
      _positive(f"model.{name}", getattr(self, name))
    _positive("model.q_lora_rank", self.q_lora_rank, optional=True)
    if self.qk_nope_head_dim < 0:
      _fail("model.qk_nope_head_dim", self.qk_nope_head_dim, "must be >= 0 (0: RoPE on every "
            "key feature)")
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
    for name in ("decode_block_size", "flash_block_q", "flash_block_k"):
      _positive(f"model.{name}", getattr(self, name))
    if self.num_mtp_layers < 0:
      _fail("model.num_mtp_layers", self.num_mtp_layers, "must be >= 0 (0: no multi-token "
            "prediction modules)")
    if self.decode_kernel not in DECODE_KERNELS:
      _fail("model.decode_kernel", self.decode_kernel, f"allowed: {', '.join(DECODE_KERNELS)}")
    if self.decode_kernel == "pallas" and self.attention != "mla":
      _fail("model.decode_kernel", self.decode_kernel, "the Pallas decode kernel computes MLA's "
            f"latent attention; attention={self.attention} decodes with auto or xla")
    _positive("model.decode_kernel_block_size", self.decode_kernel_block_size, optional=True)
    if (self.decode_kernel_block_size or 8) % 8:
      _fail("model.decode_kernel_block_size", self.decode_kernel_block_size,
            "must be a multiple of 8 (the TPU kernel's sublane tile; the GPU kernel also wants a "
            "power of 2 >= 16), or null for the platform's default")
    _positive("model.decode_kv_splits", self.decode_kv_splits)

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
    if self.attention == "mla" and self.qkv_bias:
      _fail("model.qkv_bias", self.qkv_bias, "must be false for attention=mla (DeepSeek's MLA "
            "has no biases)")
    groups, r = self.qk_rope_groups, self.qk_rope_head_dim
    if groups <= 0 or r % (2 * groups):
      _fail("model.qk_rope_groups", groups, f"must be a positive number of groups of RoPE "
            f"pairs dividing qk_rope_head_dim={r} into even widths")
    if self.attention != "mla" and groups != 1:
      _fail("model.qk_rope_groups", groups, f"must be 1 for attention={self.attention} (each "
            "kv head has its own RoPE key)")
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
    """The fields as plain values. Fields added after configs and checkpoints were first written
    (_LATER_FIELDS) appear only when they differ from their default, so a config that does not
    use them keeps its run id and its checkpoints' stored model."""
    out = dataclasses.asdict(self)
    if self.rope_scaling is not None:
      out["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
    for name, default in _LATER_FIELDS.items():
      if out[name] == default:
        del out[name]
    return out


# field -> its default
_LATER_FIELDS = {"qkv_bias": False, "qk_rope_groups": 1, "num_mtp_layers": 0}
