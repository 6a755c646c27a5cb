"""The joint low-rank factorization of a layer's no-RoPE keys and values into MLA's latent.

The keys' no-RoPE part and the values of all G kv heads are one linear map of the attention input
x [D]: kv = x M, M [D, G(N+V)]. MLA computes them as RMSNorm(c) W_UKV with c = x W_DKV [C] the
cached latent (kv_a_proj_with_mqa's first C columns, kv_a_layernorm, kv_b_proj).

Factorization (MHA2MLA's joint SVD, arXiv 2502.14837; activation-aware as TransMLA's PCA of the
keys and values, arXiv 2502.07864). With the inputs' covariance S = E[x^T x] on calibration tokens
(S = I without them: weight-only), the best rank-C map in the mean-squared sense keeps the top C
right singular vectors V_C of S^(1/2) M: kv ~ x M V_C V_C^T. The energy kept is the share of
the squared singular values in those C.

The latent norm. DeepSeek normalizes the latent (kv_a_layernorm: c / rms(c) x scale), a per-token
factor no linear map undoes. The attention input is itself x = g * u with u = h / rms(h) (the
block's input_layernorm, scale g), so |u|^2 = D up to that norm's epsilon. The latent is taken as
coordinates of u in an orthonormal basis Q [D, C] (c = u Q = x diag(1/g) Q) spanning the kept
subspace; then |c| / |u| is the share of the token's normalized state that the latent holds, and
kv_a_layernorm's scale is set to the latent's RMS over the calibration tokens (1 without them),
so a typical token passes the norm unchanged. When C = D, Q is a rotation of all of u: |c| = |u|
for every token, the norm is the identity up to the epsilons, and with C at least the keys' and
values' width the conversion is exact. Latent width beyond what the keys and values need (C >
their rank) is filled with u's own principal directions outside it, so the norm sees more of u.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

RIDGE = 1e-4  # times the mean eigenvalue, added to a calibration covariance: directions the
# calibration tokens never visit keep a little weight instead of none


@dataclasses.dataclass(frozen=True)
class Latent:
  """down [D,C]: x -> c (kv_a_proj_with_mqa's latent columns); up [C,M]: normalized c -> the
  keys' no-RoPE part and values; norm_scale: kv_a_layernorm's scale (one value for all C);
  energy_kept: share of the (activation-weighted) energy of x M the rank keeps, in [0, 1]."""

  down: np.ndarray
  up: np.ndarray
  norm_scale: float
  energy_kept: float


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  values, vectors = np.linalg.eigh(matrix)
  return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def factor_latent(m_x: np.ndarray, norm_scale_in: np.ndarray, rank: int,
                  covariance: Optional[np.ndarray] = None, latent_eps: float = 1e-6) -> Latent:
  """Factors kv = x m_x (m_x [D,M], float64) through a latent of `rank` C <= D for inputs
  x = norm_scale_in * u (norm_scale_in [D]: the block's input_layernorm scale, no zeros), with
  the covariance [D,D] of x on calibration tokens, or None (weight-only). Raises ValueError for
  C > D or a zero in norm_scale_in (that feature of u is invisible, so no latent recovers it)."""
  d, _ = m_x.shape
  if not 0 < rank <= d:
    raise ValueError(f"kv_lora_rank {rank} must be in [1, {d}]: the latent is a linear function "
                     f"of the {d}-wide hidden state")
  if np.any(norm_scale_in == 0):
    raise ValueError(f"the block's input_layernorm has {int(np.sum(norm_scale_in == 0))} zero "
                     "scales: the hidden features they multiply never reach attention")
  m_u = norm_scale_in[:, None] * m_x  # kv = u m_u
  if covariance is None:
    cov_u = np.eye(d)
  else:
    cov_u = covariance / np.outer(norm_scale_in, norm_scale_in)
  weighted = cov_u + RIDGE * np.trace(cov_u) / d * np.eye(d) if covariance is not None else cov_u
  root = _sqrt_psd(weighted)
  _, singular, vt = np.linalg.svd(root @ m_u, full_matrices=False)
  energy = singular**2
  nonzero = int(np.sum(singular > singular[0] * 1e-9)) if singular.size and singular[0] > 0 else 0
  k = min(rank, nonzero)
  q, r = np.linalg.qr(m_u @ vt[:k].T)  # the kept subspace of u, orthonormal: [D,k], [k,k]
  up = r @ vt[:k]  # [k, M]: u q r vt_k = u m_u vt_k^T vt_k
  if rank > k:  # the rest of the latent: u's principal directions outside the kept subspace
    outside = np.eye(d) - q @ q.T
    values, vectors = np.linalg.eigh(outside @ weighted @ outside)
    extra = vectors[:, np.argsort(-values, kind="stable")[:rank - k]]
    q = np.concatenate([q, extra], axis=1)
    up = np.concatenate([up, np.zeros((rank - k, m_x.shape[1]))], axis=0)
  mean_square = 1.0 if covariance is None else float(np.trace(q.T @ cov_u @ q)) / rank
  kept = float(energy[:k].sum() / energy.sum()) if energy.sum() > 0 else 1.0
  return Latent(down=q / norm_scale_in[:, None], up=up,
                norm_scale=float(np.sqrt(mean_square + latent_eps)), energy_kept=kept)
