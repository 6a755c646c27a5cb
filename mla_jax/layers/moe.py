"""DeepSeekMoE: shared experts plus top-k routed experts, with DeepSeek-V2's and V3's routers.

  V2 (scoring_func=softmax): scores = softmax(x W_gate); topk_method greedy, or
     group_limited_greedy (keep the topk_group groups with the highest max score); weights are the
     chosen scores, normalised when norm_topk_prob, otherwise times routed_scaling_factor.
  V3 (scoring_func=sigmoid, topk_method=noaux_tc): scores = sigmoid(x W_gate); experts are chosen
     on scores + e_score_correction_bias (groups ranked by the sum of their top-2), the bias never
     enters the weights; weights normalised when norm_topk_prob, then times routed_scaling_factor.

Two implementations of the routed experts (`model.moe_impl`), the same numbers:

  dispatch (default): the N x K (token, expert) pairs are sorted by expert and each expert's
     run of rows is padded to a multiple of a block of rows; one batched matmul per projection
     then multiplies every block by its expert's weight (a grouped matmul, as MegaBlocks does it),
     and each token sums its K outputs with the router weights. Dropless: no capacity factor,
     every pair is computed whatever the balance. FLOPs follow K (times the padding, at most
     1 + E * (block - 1) / (N K)), not E.
  dense: every expert on every token, combined with the router weights (zero off the chosen
     experts): E / K times the routed FLOPs. The reference dispatch is tested against.

`jax.lax.ragged_dot` computes the same grouped matmul, but XLA's CPU backend lowers it to a
masked dense product over all E groups, as dear as the dense reference (measured by
`python -m mla_jax.bench.moe ragged_dot`, docs/moe.md); `grouped_matmul`
below is the one function a backend's grouped-matmul kernel (ragged_dot where it is native,
megablox on TPU) would replace.

With a mesh whose `tensor` axis holds the experts (the "expert" sharding rule), dispatch runs
expert-parallel under shard_map: activations are replicated over that axis already (the batch is
split over data and fsdp), so each device computes only its own experts' pairs for its own
tokens and one psum over `tensor` combines them, the same collective as a tensor-parallel MLP;
no all-to-all is needed while experts and tensor parallelism share the axis.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mla_jax.config.model import ModelConfig
from mla_jax.layers.mlp import swiglu, swiglu_specs
from mla_jax.layers.params import ParamSpec, ParamSpecs, cast, declare, projection
from mla_jax.layers.precision import einsum_f32
from mla_jax.sharding import PARAM_AXES, logical_to_spec, mesh_axes_of


def _group_mask(group_scores: jax.Array, topk_group: int, experts_per_group: int) -> jax.Array:
  """Group scores [N,G] -> bool [N,E]: the experts of each row's topk_group best groups."""
  _, best = jax.lax.top_k(group_scores, topk_group)  # [N,topk_group]
  keep = jax.nn.one_hot(best, group_scores.shape[-1], dtype=bool).any(axis=-2)  # [N,G]
  return jnp.repeat(keep, experts_per_group, axis=-1)


def route_topk(scores: jax.Array, bias: jax.Array, cfg: ModelConfig
               ) -> tuple[jax.Array, jax.Array]:
  """Router scores [N,E] (float32) -> (chosen experts [N,K] int32, their weights [N,K] float32)."""
  e, k, g = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group
  per_group = e // g
  if cfg.topk_method == "noaux_tc":  # V3: choose on biased scores, weigh with the plain ones
    choice = scores + bias
    group_scores = jax.lax.top_k(choice.reshape(-1, g, per_group), 2)[0].sum(-1)  # [N,G]
    allowed = _group_mask(group_scores, cfg.topk_group, per_group)
    _, experts = jax.lax.top_k(jnp.where(allowed, choice, -jnp.inf), k)
  elif cfg.topk_method == "group_limited_greedy":  # V2: groups ranked by their best expert
    group_scores = scores.reshape(-1, g, per_group).max(-1)  # [N,G]
    allowed = _group_mask(group_scores, cfg.topk_group, per_group)
    _, experts = jax.lax.top_k(jnp.where(allowed, scores, 0.0), k)
  else:
    _, experts = jax.lax.top_k(scores, k)
  weights = jnp.take_along_axis(scores, experts, axis=-1)  # [N,K]
  normalise = cfg.norm_topk_prob and k > 1
  if normalise:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  if cfg.scoring_func == "sigmoid" or not normalise:  # V2 either normalises or scales
    weights = weights * cfg.routed_scaling_factor
  return experts.astype(jnp.int32), weights


def dense_weights(experts: jax.Array, weights: jax.Array, num_experts: int) -> jax.Array:
  """(experts [N,K], weights [N,K]) -> combine weights [N,E], zero off the chosen experts."""
  return jnp.einsum("NKE,NK->NE", jax.nn.one_hot(experts, num_experts, dtype=weights.dtype),
                    weights)


def route(scores: jax.Array, bias: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Router scores [N,E] (float32) -> combine weights [N,E], zero off the chosen experts."""
  return dense_weights(*route_topk(scores, bias, cfg), cfg.n_routed_experts)


# --- Dispatch: sort the pairs by expert, pad each expert's run to whole blocks -----------------

class Plan(NamedTuple):
  """Where each (token, choice) pair goes in the expert-sorted, block-padded row buffer."""

  rows: jax.Array  # [M] int32, pair j = token j // K, choice j % K; == num_rows when dropped
  block_expert: jax.Array  # [NB] int32: the expert whose weights multiply each block of rows
  block_size: int

  @property
  def num_rows(self) -> int:
    return self.block_expert.shape[0] * self.block_size


def default_block_size(num_pairs: int, num_experts: int) -> int:
  """Rows per block: the largest power of two <= 128 whose worst-case padding E (b - 1) stays
  within half the pairs. Each block gathers its expert's weights, so larger blocks read fewer
  weight bytes, while the padding they add grows (the measurement behind 128: docs/moe.md).
  1 for decode-sized batches: each pair then gathers only its own expert's weights."""
  b = 1
  while b < 128 and num_experts * (2 * b - 1) <= num_pairs // 2:
    b *= 2
  return b


def plan_dispatch(experts: jax.Array, num_experts: int, block_size: int) -> Plan:
  """experts [M] int32 in [0, num_experts] (num_experts = drop the pair) -> Plan.

  Rows of expert e start at the padded offset sum_{e'<e} ceil(n_e' / b) * b; the number of blocks
  is the worst case over all routings, ceil((M + E (b - 1)) / b), so shapes are static.
  """
  m, e, b = experts.shape[0], num_experts, block_size
  counts = jnp.bincount(experts, length=e + 1)  # [E+1], the last: dropped pairs
  padded = -(-counts[:e] // b) * b  # [E]
  padded_end = jnp.cumsum(padded)  # [E]
  order = jnp.argsort(experts, stable=True)  # [M] pairs sorted by expert
  first_of_group = jnp.cumsum(counts) - counts  # [E+1] sorted position of each group's first pair
  sorted_experts = experts[order]
  rank = jnp.arange(m) - first_of_group[sorted_experts]  # [M] rank within its expert's run
  num_blocks = -(-(m + e * (b - 1)) // b)
  padded_start = jnp.concatenate([padded_end - padded, jnp.array([num_blocks * b])])  # [E+1]
  rows_sorted = jnp.where(sorted_experts < e, padded_start[sorted_experts] + rank, num_blocks * b)
  rows = jnp.zeros((m,), jnp.int32).at[order].set(rows_sorted.astype(jnp.int32),
                                                  unique_indices=True)
  block_expert = jnp.searchsorted(padded_end, jnp.arange(num_blocks) * b, side="right")
  return Plan(rows, jnp.minimum(block_expert, e - 1).astype(jnp.int32), b)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, block_expert: jax.Array) -> jax.Array:
  """lhs [NB*b, X], rhs [E,X,Y], block_expert [NB] -> [NB*b, Y]: block n of b rows times
  rhs[block_expert[n]]. The grouped matmul of a block-padded expert-sorted buffer."""
  nb = block_expert.shape[0]
  blocks = lhs.reshape(nb, -1, lhs.shape[-1])  # [NB,b,X]
  return jnp.einsum("nbx,nxy->nby", blocks, rhs[block_expert]).reshape(-1, rhs.shape[-1])


def dispatch_experts(x: jax.Array, experts: jax.Array, weights: jax.Array, w_gate: jax.Array,
                     w_up: jax.Array, w_down: jax.Array, expert_offset=0,
                     block_size: int | None = None) -> jax.Array:
  """Routed experts by dispatch: x [N,D], experts/weights [N,K], w_gate/w_up [E,D,I],
  w_down [E,I,D] -> sum_k weights[n,k] * SwiGLU_{experts[n,k]}(x[n])  [N,D].

  Pairs whose expert is outside [expert_offset, expert_offset + E) are skipped (another device
  holds that expert). Gradients flow to x, the weights and the router weights.
  """
  n, k = experts.shape
  e = w_gate.shape[0]
  local = experts.reshape(-1) - expert_offset  # [M]
  local = jnp.where((local >= 0) & (local < e), local, e)  # e: not ours, dropped
  b = block_size or default_block_size(n * k, e)
  plan = plan_dispatch(local, e, b)
  tokens = jnp.arange(n * k) // k  # [M] the token of each pair
  rows = jnp.zeros((plan.num_rows, x.shape[-1]), x.dtype).at[plan.rows].set(
      x[tokens], mode="drop")  # [P,D], padding rows zero
  hidden = nn.silu(grouped_matmul(rows, w_gate, plan.block_expert)) * grouped_matmul(
      rows, w_up, plan.block_expert)  # [P,I]
  out_rows = grouped_matmul(hidden, w_down, plan.block_expert)  # [P,D]
  pair_out = out_rows.at[plan.rows].get(mode="fill", fill_value=0)  # [M,D], dropped pairs 0
  return jnp.einsum("NKD,NK->ND", pair_out.reshape(n, k, -1), weights.astype(pair_out.dtype))


def _expert_parallel_ways() -> int:
  """Devices the `expert` logical axis is split over under the current mesh (1 without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  ways = 1
  for axis in mesh_axes_of("expert"):
    ways *= mesh.shape[axis]
  return ways


def _all_gather_but_experts(w: jax.Array, spec: P, expert_axes: tuple[str, ...]) -> jax.Array:
  """Inside shard_map: gathers a local expert weight over every mesh axis that splits a
  dimension other than the expert one (fsdp on the model width), as FSDP does before use."""
  for dim, entry in enumerate(spec):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    axes = tuple(a for a in axes if a not in expert_axes)
    if axes:
      w = jax.lax.all_gather(w, axes, axis=dim, tiled=True)
  return w


def dispatch_expert_parallel(x, experts, weights, w_gate, w_up, w_down) -> jax.Array:
  """dispatch_experts with the experts split over the mesh axes of the 'expert' rule: each device
  runs its own E / ways experts on its tokens (split over the batch axes as the rest of the
  model splits them, replicated over the expert axes), then one psum over the expert axes
  combines them. Every mesh axis is manual here (XLA's partitioner aborts on the gathers of a
  partially manual one when fsdp > 1); the weights' other splits (fsdp) are all-gathered."""
  mesh = jax.sharding.get_abstract_mesh()
  expert_axes = mesh_axes_of("expert")
  e_local = w_gate.shape[0] // _expert_parallel_ways()
  token_axes = tuple(a for a in mesh_axes_of("batch") if mesh.shape[a] > 1)
  ways = 1
  for a in token_axes:
    ways *= mesh.shape[a]
  tokens = P(token_axes) if token_axes and x.shape[0] % ways == 0 else P()
  w_in, w_out = logical_to_spec(PARAM_AXES["experts_gate_proj"]), logical_to_spec(
      PARAM_AXES["experts_down_proj"])

  def local(x, experts, weights, w_gate, w_up, w_down):
    index = 0
    for axis in expert_axes:
      index = index * jax.lax.axis_size(axis) + jax.lax.axis_index(axis)
    w_gate, w_up = (_all_gather_but_experts(w, w_in, expert_axes) for w in (w_gate, w_up))
    w_down = _all_gather_but_experts(w_down, w_out, expert_axes)
    out = dispatch_experts(x, experts, weights, w_gate, w_up, w_down,
                           expert_offset=index * e_local)
    return jax.lax.psum(out, expert_axes)

  return jax.shard_map(local, in_specs=(tokens, tokens, tokens, w_in, w_in, w_out),
                       out_specs=tokens, check_vma=False)(x, experts, weights, w_gate, w_up,
                                                          w_down)


def moe_specs(config: ModelConfig) -> ParamSpecs:
  """The router gate [D,E] (float32, like DeepSeek's), V3's e_score_correction_bias [E], the
  routed experts' stacked SwiGLU weights [E,D,I] / [E,I,D] and the shared experts' SwiGLU."""
  cfg = config
  d, e, i = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
  specs: ParamSpecs = {"gate": ParamSpec((d, e), ("embed", "expert"),
                                         nn.initializers.normal(cfg.initializer_range))}
  if cfg.topk_method == "noaux_tc":  # V3 only; set by load balancing outside the gradient
    specs["e_score_correction_bias"] = ParamSpec((e,), ("expert",), nn.initializers.zeros)
  for name, shape in (("experts_gate_proj", (e, d, i)), ("experts_up_proj", (e, d, i)),
                      ("experts_down_proj", (e, i, d))):
    specs[name] = projection(cfg, shape, PARAM_AXES[name])
  if cfg.n_shared_experts:
    specs["shared_experts"] = swiglu_specs(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts)
  return specs


def deepseek_moe(config: ModelConfig, params: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [B,T,D] -> (y [B,T,D], the expert-balance loss: aux_loss_alpha * balance_loss, a float32
  scalar, 0 when aux_loss_alpha is 0), with the weights of moe_specs."""
  cfg = config
  b, t, d = x.shape
  e = cfg.n_routed_experts
  router = jnp.asarray(params["gate"]).astype(jnp.float32)  # [D,E]
  bias = jnp.zeros((e,), jnp.float32)
  if cfg.topk_method == "noaux_tc":
    bias = jax.lax.stop_gradient(jnp.asarray(params["e_score_correction_bias"], jnp.float32))
  tokens = x.reshape(b * t, d)  # [N,D]
  logits = einsum_f32("ND,DE->NE", tokens, router)  # [N,E]
  scores = jax.nn.softmax(logits, -1) if cfg.scoring_func == "softmax" else jax.nn.sigmoid(logits)
  experts, weights = route_topk(scores, bias, cfg)  # [N,K], [N,K]

  w_gate, w_up, w_down = (cast(params[name], cfg) for name in (
      "experts_gate_proj", "experts_up_proj", "experts_down_proj"))  # [E,D,I], [E,D,I], [E,I,D]
  if cfg.moe_impl == "dense":
    out = _dense_experts(tokens, dense_weights(experts, weights, e), w_gate, w_up, w_down)
  else:
    ways = _expert_parallel_ways()
    run = dispatch_expert_parallel if ways > 1 and e % ways == 0 else dispatch_experts
    out = run(tokens, experts, weights, w_gate, w_up, w_down)
  out = out.reshape(b, t, d)
  if cfg.n_shared_experts:
    out = out + swiglu(cfg, params["shared_experts"], x)
  aux = jnp.zeros((), jnp.float32)
  if cfg.aux_loss_alpha > 0:
    aux = cfg.aux_loss_alpha * balance_loss(scores, dense_weights(experts, weights, e), cfg)
  return out, aux


def _dense_experts(x, combine, w_gate, w_up, w_down) -> jax.Array:
  """Every expert on every token: x [N,D], combine [N,E] -> [N,D]."""
  hidden = nn.silu(jnp.einsum("ND,EDI->NEI", x, w_gate)) * jnp.einsum("ND,EDI->NEI", x, w_up)
  expert_out = jnp.einsum("NEI,EID->NED", hidden, w_down)
  return jnp.einsum("NED,NE->ND", expert_out, combine.astype(expert_out.dtype))


class DeepSeekMoE(nn.Module):
  """x [B,T,D] -> [B,T,D]. With aux_loss_alpha > 0 it sows the expert-balance loss into the
  'losses' collection (apply with mutable=['losses'] to read it)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out, aux = deepseek_moe(self.config, declare(self, moe_specs(self.config)), x)
    if self.config.aux_loss_alpha > 0:
      self.sow("losses", "expert_balance", aux)
    return out


def balance_loss(scores: jax.Array, weights: jax.Array, cfg: ModelConfig) -> jax.Array:
  """DeepSeek-V2's expert-level balance loss sum_i f_i P_i over the N tokens of the batch:
  f_i = E / (K N) * (tokens routed to expert i), P_i = mean routing probability of expert i."""
  e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
  probs = scores / scores.sum(-1, keepdims=True)  # sigmoid scores normalised like softmax ones
  load = (weights > 0).astype(jnp.float32).mean(0) * e / k  # f_i  [E]
  return jnp.sum(load * probs.mean(0))
