"""Which RoPE features survive a GQA -> MLA conversion, and in which shared key.

A source layer has G kv heads, each with P = R_s/2 RoPE pairs; pair i turns at
f_i = theta_s ** (-2i / R_s). The MLA layer has one k_rope of R_t features: g_r RoPE keys of m
pairs each (model.qk_rope_groups = g_r; DeepSeek's format has g_r = 1), pair j of each key turning
at theta_t ** (-2j / 2m). RoPE on a pair is exact only at its own frequency, so slot j must take
a source pair whose frequency equals theta_t ** (-j / m): i_j = j * stride with
theta_t = theta_s ** (stride * m / P). The admissible choices are the strides s with
(m - 1) * s <= P - 1: s = 1 keeps the m fastest pairs, larger strides spread them out (MHA2MLA's
"high" and "uniform" frequency sets are both strides). One stride serves the whole model, since
rope_theta is one number.

At each kept frequency the G kv heads hold G two-dimensional keys, and slot j has room for g_r
of them: a g_r x G matrix A_j with orthonormal rows picks which combinations of heads it keeps.
Rotating every head's pair i by the same angle commutes with mixing heads, so the kept
combinations keep RoPE exactly; what A_j leaves out (the residual, (I - A_j^T A_j) applied over
heads) and every pair off the kept frequencies lose their rotation and join the keys' no-RoPE
part, which the latent then compresses.

  mha2mla (arXiv 2502.14837): A_j's rows are the g_r heads with the largest contribution to the
     attention scores at that pair, sum over the group's query heads of mean |q_pair| x mean
     |k_pair| on calibration tokens (the norms of the weights' columns without them), and the
     stride keeps the most contribution over all layers.
  transmla (RoRoPE, arXiv 2502.07864): A_j's rows are the top g_r principal directions of the
     G x G covariance of the heads' pair-i keys, which concentrates that frequency's positional
     signal into the kept keys; the stride keeps the most key energy.

With g_r = G, stride 1 and m = P every pair keeps its rotation in every head: the conversion of
the RoPE part is exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mla_jax.config.model import ModelConfig

METHODS = ("mha2mla", "transmla")


def rope_layout(source: ModelConfig, rope_dim: int) -> tuple[int, int]:
  """(RoPE keys g_r, pairs per key m) of a k_rope of rope_dim features for this source: one key
  of rope_dim / 2 pairs up to one kv head's RoPE width, whole keys (one per kv head kept) above
  it. Raises ValueError (one line, naming --rope-dim) for an odd width, a width that splits into
  no whole keys, or more than the source's kv heads hold."""
  width, heads = source.qk_rope_head_dim, source.kv_heads
  if rope_dim <= 0 or rope_dim % 2:
    raise ValueError(f"--rope-dim {rope_dim} does not divide into RoPE pairs: give a positive "
                     f"even number (each pair is two features rotated together), at most "
                     f"{width} for one shared key as DeepSeek's MLA has")
  if rope_dim > width * heads:
    raise ValueError(f"--rope-dim {rope_dim} is larger than possible: the source's {heads} kv "
                     f"heads hold {heads} x {width} = {heads * width} RoPE features per token")
  if rope_dim <= width:
    return 1, rope_dim // 2
  if rope_dim % width:
    raise ValueError(f"--rope-dim {rope_dim}: above one kv head's RoPE width ({width}) k_rope "
                     f"holds whole RoPE keys, one per kv head kept: a multiple of {width} up to "
                     f"{width * heads}")
  return rope_dim // width, width // 2


def pair_features(offset: int, width: int, pair: int, interleave: bool) -> np.ndarray:
  """The two features [2] of RoPE pair `pair` in a RoPE block of `width` features starting at
  `offset`: (2p, 2p+1) interleaved, (p, p + width/2) in the half-rotation layout."""
  if interleave:
    return offset + np.array([2 * pair, 2 * pair + 1])
  return offset + np.array([pair, pair + width // 2])


@dataclasses.dataclass(frozen=True)
class LayerRopeStats:
  """What the plan needs of one source layer (float64, from calibration or from the weights):
  contribution [G,P] (MHA2MLA's score of each kv head's pair) and key_covariance [P,G,G] (the
  covariance over kv heads of each pair's two-dimensional keys)."""

  contribution: np.ndarray
  key_covariance: np.ndarray


@dataclasses.dataclass(frozen=True)
class RopePlan:
  """groups (g_r) RoPE keys of `pairs` (m) pairs; slot j takes source pair j * stride at
  rope_theta = theta; directions[layer] [m, g_r, G] are each slot's kept head combinations
  (orthonormal rows); kept[layer] the share of that layer's score (contribution or key energy)
  the kept slots carry; residual_pairs the source pairs whose rotation some head loses, which
  become no-RoPE features."""

  method: str
  groups: int
  pairs: int
  stride: int
  theta: float
  directions: tuple[np.ndarray, ...]
  kept: tuple[float, ...]
  residual_pairs: tuple[int, ...]


def _slot_choice(method: str, stats: LayerRopeStats, pair: int, groups: int
                 ) -> tuple[np.ndarray, float]:
  """(A [g_r, G] orthonormal rows, the score they keep) for one kept pair of one layer."""
  if method == "mha2mla":
    score = stats.contribution[:, pair]  # [G]
    heads = np.sort(np.argsort(-score, kind="stable")[:groups])
    return np.eye(len(score))[heads], float(score[heads].sum())
  values, vectors = np.linalg.eigh(stats.key_covariance[pair])  # ascending
  order = np.argsort(-values, kind="stable")[:groups]
  return vectors[:, order].T, float(np.clip(values[order], 0, None).sum())


def _total(method: str, stats: LayerRopeStats) -> float:
  if method == "mha2mla":
    return float(stats.contribution.sum())
  return float(np.trace(stats.key_covariance, axis1=1, axis2=2).sum())


def plan_rope(method: str, source: ModelConfig, rope_dim: int,
              stats: list[LayerRopeStats]) -> RopePlan:
  """The plan of `method` for a k_rope of rope_dim features (rope_layout's checks apply), the
  stride keeping the largest share of the score summed over layers. ValueError for an unknown
  method."""
  if method not in METHODS:
    raise ValueError(f"--method {method!r} is not supported: allowed {', '.join(METHODS)}")
  groups, pairs = rope_layout(source, rope_dim)
  total_pairs, kv_heads = source.qk_rope_head_dim // 2, source.kv_heads
  strides = range(1, (total_pairs - 1) // (pairs - 1) + 1) if pairs > 1 else [1]
  best = None
  for stride in strides:
    choices = [[_slot_choice(method, layer, j * stride, groups) for j in range(pairs)]
               for layer in stats]
    kept = [sum(score for _, score in layer) / max(_total(method, s), 1e-300)
            for layer, s in zip(choices, stats)]
    if best is None or sum(kept) > sum(best[1]) + 1e-12:
      best = stride, kept, choices
  stride, kept, choices = best
  on_grid = {j * stride for j in range(pairs)}
  residual = tuple(i for i in range(total_pairs) if i not in on_grid or groups < kv_heads)
  theta = float(source.rope_theta) ** (stride * pairs / total_pairs)
  directions = tuple(np.stack([a for a, _ in layer]) for layer in choices)
  return RopePlan(method, groups, pairs, stride, theta, directions, tuple(kept), residual)
