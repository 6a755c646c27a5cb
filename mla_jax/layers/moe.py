"""DeepSeekMoE: shared experts plus top-k routed experts, with DeepSeek-V2's and V3's routers.

  V2 (scoring_func=softmax): scores = softmax(x W_gate); topk_method greedy, or
     group_limited_greedy (keep the topk_group groups with the highest max score); weights are the
     chosen scores, normalised when norm_topk_prob, otherwise times routed_scaling_factor.
  V3 (scoring_func=sigmoid, topk_method=noaux_tc): scores = sigmoid(x W_gate); experts are chosen
     on scores + e_score_correction_bias (groups ranked by the sum of their top-2), the bias never
     enters the weights; weights normalised when norm_topk_prob, then times routed_scaling_factor.

Exact first: every expert runs on every token and the router's weights (zero for unchosen
experts) combine them. That costs n_routed_experts / num_experts_per_tok times the FLOPs of a
dispatching implementation, and is the reference such an implementation must match.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mla_jax.config import ModelConfig
from mla_jax.layers.mlp import SwiGLU
from mla_jax.layers.params import weight
from mla_jax.layers.precision import einsum_f32


def _top_k_mask(values: jax.Array, k: int) -> jax.Array:
  """[N,E] -> bool [N,E], True on each row's k largest entries."""
  _, index = jax.lax.top_k(values, k)  # [N,k]
  return jax.nn.one_hot(index, values.shape[-1], dtype=bool).any(axis=-2)


def _group_mask(group_scores: jax.Array, topk_group: int, experts_per_group: int) -> jax.Array:
  """Group scores [N,G] -> bool [N,E]: the experts of each row's topk_group best groups."""
  keep = _top_k_mask(group_scores, topk_group)  # [N,G]
  return jnp.repeat(keep, experts_per_group, axis=-1)


def route(scores: jax.Array, bias: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Router scores [N,E] (float32) -> combine weights [N,E], zero off the chosen experts."""
  e, k, g = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group
  per_group = e // g
  if cfg.topk_method == "noaux_tc":  # V3: choose on biased scores, weigh with the plain ones
    choice = scores + bias
    group_scores = jax.lax.top_k(choice.reshape(-1, g, per_group), 2)[0].sum(-1)  # [N,G]
    allowed = _group_mask(group_scores, cfg.topk_group, per_group)
    chosen = _top_k_mask(jnp.where(allowed, choice, -jnp.inf), k)
  elif cfg.topk_method == "group_limited_greedy":  # V2: groups ranked by their best expert
    group_scores = scores.reshape(-1, g, per_group).max(-1)  # [N,G]
    allowed = _group_mask(group_scores, cfg.topk_group, per_group)
    chosen = _top_k_mask(jnp.where(allowed, scores, 0.0), k)
  else:
    chosen = _top_k_mask(scores, k)
  weights = jnp.where(chosen, scores, 0.0)  # [N,E]
  normalise = cfg.norm_topk_prob and k > 1
  if normalise:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  if cfg.scoring_func == "sigmoid" or not normalise:  # V2 either normalises or scales
    weights = weights * cfg.routed_scaling_factor
  return weights


class DeepSeekMoE(nn.Module):
  """x [B,T,D] -> [B,T,D]. With aux_loss_alpha > 0 it sows the expert-balance loss into the
  'losses' collection (apply with mutable=['losses'] to read it)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    b, t, d = x.shape
    e, i = cfg.n_routed_experts, cfg.moe_intermediate_size
    router = self.param("gate", nn.initializers.normal(cfg.initializer_range), (d, e),
                        jnp.float32)  # [D,E], kept in float32 like DeepSeek's
    bias = jnp.zeros((e,), jnp.float32)
    if cfg.topk_method == "noaux_tc":  # V3 only; set by load balancing outside the gradient
      bias = jax.lax.stop_gradient(self.param("e_score_correction_bias", nn.initializers.zeros,
                                              (e,), jnp.float32))
    logits = einsum_f32("ND,DE->NE", x.reshape(b * t, d), router)  # [N,E]
    scores = jax.nn.softmax(logits, -1) if cfg.scoring_func == "softmax" else jax.nn.sigmoid(logits)
    weights = route(scores, bias, cfg)  # [N,E]

    w_gate = weight(self, "experts_gate_proj", (e, d, i))
    w_up = weight(self, "experts_up_proj", (e, d, i))
    w_down = weight(self, "experts_down_proj", (e, i, d))
    hidden = nn.silu(jnp.einsum("BTD,EDI->BTEI", x, w_gate)) * jnp.einsum("BTD,EDI->BTEI", x, w_up)
    expert_out = jnp.einsum("BTEI,EID->BTED", hidden, w_down)
    out = jnp.einsum("BTED,BTE->BTD", expert_out,
                     weights.reshape(b, t, e).astype(expert_out.dtype))
    if cfg.n_shared_experts:
      out = out + SwiGLU(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts,
                         name="shared_experts")(x)
    if cfg.aux_loss_alpha > 0:
      self.sow("losses", "expert_balance", cfg.aux_loss_alpha * balance_loss(scores, weights, cfg))
    return out


def balance_loss(scores: jax.Array, weights: jax.Array, cfg: ModelConfig) -> jax.Array:
  """DeepSeek-V2's expert-level balance loss sum_i f_i P_i over the N tokens of the batch:
  f_i = E / (K N) * (tokens routed to expert i), P_i = mean routing probability of expert i."""
  e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
  probs = scores / scores.sum(-1, keepdims=True)  # sigmoid scores normalised like softmax ones
  load = (weights > 0).astype(jnp.float32).mean(0) * e / k  # f_i  [E]
  return jnp.sum(load * probs.mean(0))
