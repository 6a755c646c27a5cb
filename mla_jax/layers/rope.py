"""Rotary position embeddings in both layouts, with DeepSeek's YaRN context extension.

Only the decoupled RoPE part of MLA's queries and keys (width R = qk_rope_head_dim) is rotated.
The layout is the checkpoint's: DeepSeek's own weights rotate interleaved pairs (x0,x1),(x2,x3)...;
half-rotation pairs x_i with x_{i+R/2}. The two differ by a fixed permutation of the R features.

Pair j (of R/2) turns at inv_freq[j] = rope_theta ** (-2j / R). With model.qk_rope_groups = g > 1
(MLA only) the R/2 pairs are g groups of R/(2g), each group turning at the frequencies of a
RoPE key of width R/g: several RoPE keys side by side (docs/conversion.md).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax.config.model import ModelConfig, YarnScaling


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
  """The feature index whose wavelength fits `num_rotations` times into `max_pos` tokens."""
  return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def _yarn_inv_freq(dim: int, base: float, yarn: YarnScaling) -> np.ndarray:
  """Blends interpolated (low-frequency) and original (high-frequency) rotary frequencies."""
  exponents = np.arange(0, dim, 2, dtype=np.float64) / dim  # [R/2]
  freq_extra = 1.0 / base**exponents
  freq_inter = 1.0 / (yarn.factor * base**exponents)
  low = max(math.floor(_yarn_correction_dim(
      yarn.beta_fast, dim, base, yarn.original_max_position_embeddings)), 0)
  high = min(math.ceil(_yarn_correction_dim(
      yarn.beta_slow, dim, base, yarn.original_max_position_embeddings)), dim - 1)
  if low == high:
    high += 0.001  # avoid a zero-width ramp, as DeepSeek's reference does
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  keep_original = 1.0 - ramp  # 1 for fast-rotating features, 0 for slow ones
  return freq_inter * (1.0 - keep_original) + freq_extra * keep_original


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse frequencies [R/2] of the pairs as a host constant (shapes only depend on the
  config): one RoPE key's, repeated for each of model.qk_rope_groups."""
  groups, base = config.qk_rope_groups, config.rope_theta
  dim = config.qk_rope_head_dim // groups  # one group's width
  if config.rope_scaling is not None:
    inv_freq = _yarn_inv_freq(dim, base, config.rope_scaling)
  else:
    inv_freq = 1.0 / base**(np.arange(0, dim, 2, dtype=np.float64) / dim)
  return np.tile(inv_freq, groups).astype(np.float32)


def rope_cos_sin(positions: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B,T,R/2] in float32 for integer positions [B,T], with YaRN's attention factor."""
  inv_freq = jnp.asarray(rope_inv_freq(config))  # [R/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,R/2]
  factor = 1.0 if config.rope_scaling is None else config.rope_scaling.attention_factor()
  return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleave: bool) -> jax.Array:
  """Rotates x [B,T,H,R] by angles whose cos/sin are [B,T,R/2]; computes in float32."""
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B,T,1,R/2], broadcast over heads
  xf = x.astype(jnp.float32)
  if interleave:
    even, odd = xf[..., 0::2], xf[..., 1::2]  # [B,T,H,R/2] each
    rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    out = rotated.reshape(xf.shape)  # pairs back in place: (e0,o0),(e1,o1),...
  else:
    first, second = jnp.split(xf, 2, axis=-1)  # [B,T,H,R/2] each
    out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return out.astype(x.dtype)
