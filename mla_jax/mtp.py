"""DeepSeek-V3's multi-token prediction (MTP; DeepSeek-V3 report, section 2.2) as pure functions.

D sequential modules follow the model (model.num_mtp_layers = D; parameters mtp_layers_0 ..
mtp_layers_{D-1}, declared by mla_jax.model.mtp_layer_specs). Depth k (1-based, module k-1) at
position i combines the previous depth's hidden state h_i^{k-1} with the embedding of the token k
positions ahead, t_{i+k}, and predicts t_{i+k+1}:

  h'_i   = eh_proj [RMSNorm_e(Emb(t_{i+k})) ; RMSNorm_h(h_i^{k-1})]   ("BTE,ED->BTD", E = 2D)
  h_i^k  = Block_k(h'_0 .. h'_i)                                      (causal; dense or MoE)
  logits = lm_head(RMSNorm_shared_head(h_i^k))                         [B,T,V], for t_{i+k+1}

h^0 is the model's final hidden state after its norm (transformer_hidden), the one lm_head reads;
h^k handed to depth k+1 is the block's output before shared_head.norm. The concatenation puts the
embedding first: DeepSeek's released eh_proj is read that way by vLLM's and SGLang's DeepSeek MTP
code (the report writes the two the other way round). Emb and lm_head are the model's own
embed_tokens and lm_head, shared as the report says; DeepSeek's checkpoints store copies of them
in each MTP layer, which load_hf checks and does not keep twice.

Training (mtp_forward): depth k runs over positions 0 .. T-1-k of a [B,T] batch (the positions
whose t_{i+k} is in the batch), so its logits [B,T-k,V] are scored against targets[:, k:];
train/step.py weights the depths' cross-entropies by train.mtp_loss_weight / D.

Inference (mtp_step over a cache): one depth over new positions with its own one-layer cache, the
draft model of self-speculative decoding (mla_jax/speculative.py).
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

from mla_jax.cache import Cache
from mla_jax.config.model import ModelConfig
from mla_jax.layers.norms import rms_norm
from mla_jax.layers.params import cast
from mla_jax.model import decoder_block, output_logits, remat_block
from mla_jax.paged_cache import PagedCache


def check_depth(config: ModelConfig, depth: int) -> None:
  """Raises ValueError unless depth (0-based) names one of the model's MTP modules."""
  if not config.num_mtp_layers:
    raise ValueError("the model has no multi-token-prediction module (model.num_mtp_layers=0), "
                     "so it cannot draft: train one with model.num_mtp_layers=1 "
                     "(configs/tiny_mtp.yaml), or load a DeepSeek-V3 checkpoint with its MTP layer")
  if not 0 <= depth < config.num_mtp_layers:
    raise ValueError(f"MTP depth {depth} does not exist: model.num_mtp_layers="
                     f"{config.num_mtp_layers} (depths 0 .. {config.num_mtp_layers - 1})")


def mtp_step(config: ModelConfig, params: dict, depth: int, hidden: jax.Array,
             tokens: jax.Array, cache: Union[Cache, PagedCache, None] = None, *,
             num_tokens: Optional[jax.Array] = None, attn_impl: str = "auto",
             absorbed: Optional[dict] = None, remat: str = "none"
             ) -> tuple[jax.Array, Union[Cache, PagedCache, None], jax.Array]:
  """MTP module `depth` (0-based) over T positions: hidden [B,T,D] (h^depth at those positions:
  the model's final hidden states for depth 0) and tokens [B,T] int (the token depth + 1 ahead of
  each position) -> (h^{depth+1} [B,T,D], the updated cache or None, the block's expert-balance
  loss (float32 scalar)).

  params: the whole model's tree (plain arrays). cache: this module's own cache, a Cache or
  PagedCache of one layer whose lengths count its filled positions; the T positions go after
  them, num_tokens [B] of them real (default all T). absorbed: the module's self_attn absorbed
  weights or None. Raises ValueError for a depth the model does not have.
  """
  cfg = config
  check_depth(cfg, depth)
  p = params[f"mtp_layers_{depth}"]
  dtype = jnp.dtype(cfg.dtype)
  embedded = jnp.take(params["embed_tokens"], tokens, axis=0).astype(dtype)  # [B,T,D]
  e = rms_norm(p["enorm"], embedded, cfg.rms_norm_eps, dtype)
  h = rms_norm(p["hnorm"], hidden.astype(dtype), cfg.rms_norm_eps, dtype)
  x = jnp.einsum("BTE,ED->BTD", jnp.concatenate([e, h], axis=-1), cast(p["eh_proj"], cfg))
  if cache is None:
    layer_cache, lengths = None, None
  else:
    b, t = tokens.shape
    num_tokens = jnp.full((b,), t, jnp.int32) if num_tokens is None else num_tokens
    lengths = cache.lengths
    layer_cache = (cache.with_tables() if isinstance(cache, PagedCache) else cache.layers)[0]
  layer = cfg.num_layers + depth  # decides dense MLP or DeepSeekMoE, as in the checkpoint

  def block(p_, x_, c_, a_):
    return decoder_block(cfg, layer, p_, x_, c_, lengths, num_tokens, attn_impl, a_)

  x, layer_cache, aux = remat_block(block, cfg, remat)(p, x, layer_cache, absorbed)
  if cache is None:
    return x, None, aux
  if isinstance(cache, PagedCache):
    return x, cache.updated([layer_cache], num_tokens), aux
  return x, Cache(layers=(layer_cache,), lengths=cache.lengths + num_tokens), aux


def mtp_logits(config: ModelConfig, params: dict, depth: int, hidden: jax.Array,
               decoding: bool = False) -> jax.Array:
  """Module `depth`'s output: shared_head.norm, then the model's lm_head: hidden [B,T,D] ->
  logits [B,T,V] float32."""
  norm = params[f"mtp_layers_{depth}"]["shared_head"]["norm"]
  normed = rms_norm(norm, hidden, config.rms_norm_eps, jnp.dtype(config.dtype))
  return output_logits(config, params, normed, decoding)


def mtp_forward(config: ModelConfig, params: dict, hidden: jax.Array, tokens: jax.Array, *,
                remat: str = "none", attn_impl: str = "auto"
                ) -> tuple[list[jax.Array], jax.Array]:
  """All D depths over a training batch, no cache: hidden [B,T,D] (transformer_hidden of tokens)
  and tokens [B,T] -> (one logits array per depth k = 1..D, [B,T-k,V] float32: position i
  predicts t_{i+k+1}, i.e. targets[:, k:] of next-token targets; the summed expert-balance
  loss). attn_impl: the blocks' attention path (train.attn_impl). Raises ValueError when
  T <= D (depth D would have no position)."""
  cfg = config
  t = tokens.shape[1]
  if t <= cfg.num_mtp_layers:
    raise ValueError(f"{t} tokens per sequence leave no position for MTP depth "
                     f"{cfg.num_mtp_layers}: train.seq_len must exceed model.num_mtp_layers="
                     f"{cfg.num_mtp_layers}")
  out, aux = [], jnp.zeros((), jnp.float32)
  h = hidden
  for depth in range(cfg.num_mtp_layers):
    k = depth + 1
    h, _, depth_aux = mtp_step(cfg, params, depth, h[:, :t - k], tokens[:, k:], remat=remat,
                               attn_impl=attn_impl)
    out.append(mtp_logits(cfg, params, depth, h))
    aux = aux + depth_aux
  return out, aux
