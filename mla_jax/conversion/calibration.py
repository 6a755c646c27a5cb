"""Calibration for the conversion: text -> token windows -> per-layer statistics of the source
model's attention inputs, and the same statistics from the weights alone when there is no text.

The statistics of layer l come from the source model itself (its attention input x, after the
block's input_layernorm), as in MHA2MLA and TransMLA: the covariance E[x^T x] [D,D] that the
activation-aware factorization weights the keys and values with (latent.py), and the mean norm of
each RoPE pair of every query and key head, MHA2MLA's contribution score (rope_plan.py). All in
float64 on the host, accumulated batch by batch, so the calibration set may be larger than what
fits on the device at once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from mla_jax.config.model import ModelConfig
from mla_jax.config.run import DataConfig
from mla_jax.conversion.rope_plan import LayerRopeStats, pair_features

STDLIB = "stdlib"  # --calibration stdlib: the corpus `mla-jax train` uses with data.path=null


def calibration_tokens(data: str, tokenizer: Any, seq_len: int, samples: int,
                       seed: int = 0) -> np.ndarray:
  """`samples` windows [S, seq_len] int32 of the training split of `data` (a file, directory or
  glob as data.path takes them, or "stdlib"), split by `mla-jax train`'s rule so a model's
  validation text stays out, tokenized by the source's tokenizer. Raises ValueError naming
  --calibration for a path that matches nothing, only empty files, non-text, or fewer tokens
  than one window."""
  from mla_jax.tokenizers import ByteTokenizer
  from mla_jax.train.data import batch_at, load_corpus

  path = None if data == STDLIB else data
  corpus = load_corpus(DataConfig(path=path), min_tokens=2, option="--calibration")
  tokens = corpus.train
  if not isinstance(tokenizer, ByteTokenizer):  # the corpus is bytes: re-tokenize each file
    pieces = np.split(tokens, np.flatnonzero(tokens == ByteTokenizer.EOS) + 1)
    eos = [] if tokenizer.EOS is None else [tokenizer.EOS]
    tokens = np.asarray([t for piece in pieces if len(piece)
                         for t in tokenizer.encode(bytes(piece[piece < 256].astype(np.uint8))
                                                   .decode("utf-8", errors="replace")) + eos])
  if len(tokens) < seq_len + 1:
    raise ValueError(f"--calibration {data!r} holds {len(tokens):,} tokens in its training "
                     f"split, fewer than one window of {seq_len + 1}: give more text")
  return batch_at(tokens, seed, 0, 0, samples, seq_len)[0]


@dataclasses.dataclass
class LayerStats:
  """Sums over calibration tokens for one layer: x^T x [D,D], |q pair| [H,P], |k pair| [G,P]."""

  covariance: np.ndarray
  q_norms: np.ndarray
  k_norms: np.ndarray
  tokens: int = 0


def _pairs(config: ModelConfig) -> np.ndarray:
  """The features [P,2] of each RoPE pair of a head of N+R features."""
  n, r = config.qk_nope_head_dim, config.qk_rope_head_dim
  return np.stack([pair_features(n, r, i, config.rope_interleave) for i in range(r // 2)])


def _pair_norms(z: np.ndarray, config: ModelConfig) -> np.ndarray:
  """z [..., heads, N+R] -> the norm of each RoPE pair [..., heads, P]."""
  return np.sqrt((z[..., _pairs(config)] ** 2).sum(-1))


def attention_inputs(config: ModelConfig):
  """A jitted function (params, tokens [B,T]) -> the attention input x [B,T,D] of every layer
  (float32), running the source model's blocks (unrolled parameters)."""
  import jax
  import jax.numpy as jnp

  from mla_jax.layers.norms import rms_norm
  from mla_jax.model import decoder_block

  @jax.jit
  def run(params, tokens):
    x = jnp.take(params["embed_tokens"], tokens, axis=0).astype(config.dtype)
    inputs = []
    for layer in range(config.num_layers):
      block = params[f"layers_{layer}"]
      inputs.append(rms_norm(block["input_layernorm"], x, config.rms_norm_eps, jnp.float32))
      x, _, _ = decoder_block(config, layer, block, x, None, None, None)
    return inputs

  return run


def calibrate(config: ModelConfig, params: dict, windows: np.ndarray, batch_size: int = 8
              ) -> list[LayerStats]:
  """Per-layer statistics of the source (a baseline model, unrolled params as NumPy or JAX
  arrays) over the calibration windows [S,T], batch_size windows per forward pass."""
  import jax

  run = attention_inputs(config)
  stats = None
  for start in range(0, len(windows), batch_size):
    inputs = jax.device_get(run(params, windows[start:start + batch_size]))
    if stats is None:
      stats = [LayerStats(np.zeros((config.hidden_size,) * 2), 0.0, 0.0) for _ in inputs]
    for layer, (x, s) in enumerate(zip(inputs, stats)):
      attn = params[f"layers_{layer}"]["self_attn"]
      x = np.asarray(x, np.float64).reshape(-1, config.hidden_size)
      s.covariance += x.T @ x
      s.q_norms = s.q_norms + _pair_norms(np.einsum("md,dhk->mhk", x, np.asarray(
          attn["q_proj"], np.float64)), config).sum(0)
      s.k_norms = s.k_norms + _pair_norms(np.einsum("md,dgk->mgk", x, np.asarray(
          attn["k_proj"], np.float64)), config).sum(0)
      s.tokens += len(x)
  return stats


def rope_stats(config: ModelConfig, attn: dict, stats: Optional[LayerStats]) -> LayerRopeStats:
  """rope_plan's inputs for one layer: from calibration sums, or from the weights alone (unit
  input covariance; column norms for the pair norms)."""
  wq = np.asarray(attn["q_proj"], np.float64)  # [D,H,K]
  wk = np.asarray(attn["k_proj"], np.float64)  # [D,G,K]
  h, g = config.num_heads, config.kv_heads
  if stats is None:
    cov = np.eye(config.hidden_size)  # each pair's [D,2] columns' Frobenius norm: [H,P], [G,P]
    q_norms = np.sqrt((wq[:, :, _pairs(config)] ** 2).sum(axis=(0, -1)))
    k_norms = np.sqrt((wk[:, :, _pairs(config)] ** 2).sum(axis=(0, -1)))
  else:
    cov = stats.covariance / stats.tokens
    q_norms, k_norms = stats.q_norms / stats.tokens, stats.k_norms / stats.tokens
  contribution = q_norms.reshape(g, h // g, -1).sum(1) * k_norms  # [G,P]
  n, r = config.qk_nope_head_dim, config.qk_rope_head_dim
  covariance = np.zeros((r // 2, g, g))
  for i in range(r // 2):
    cols = wk[:, :, pair_features(n, r, i, config.rope_interleave)]  # [D,G,2]
    covariance[i] = np.einsum("dga,de,eha->gh", cols, cov, cols)
  return LayerRopeStats(contribution=contribution, key_covariance=covariance)
