"""Multi-head Latent Attention (DeepSeek-V2/V3), with naive and absorbed attention paths and their
blocked (flash) forms.

Keys and values of all heads are produced from one latent c_kv [B,S,C] per token plus one shared
RoPE key k_rope [B,S,R]; only those two are cached. With W_UK [C,H,N] and W_UV [C,H,V] the two
halves of kv_b_proj:

  naive     k_nope = c_kv W_UK, v = c_kv W_UV per head, then ordinary attention (cheap when T ~ S:
            training and prefill);
  absorbed  q_lat = q_nope W_UK^T attends over c_kv itself, W_UV is applied after the weighted sum
            (the cache is read as [B,S,C], never expanded to per-head keys);
  flash     the absorbed math as flash-decoding (layers/flash_decode.py): the cache walked in
            blocks with an online softmax, each block read once, stopping at the longest
            sequence; the default with a cache ('auto'). 'absorbed' stays as its reference.
  flash_attention
            the naive math as flash attention (layers/flash_attention.py): blocked, with its
            own backward pass, in memory linear in T; the default for training at long T
            ('auto'), and generate's prefill of long prompts. 'naive' stays as its reference.

All give the same numbers up to float rounding. The rope term q_rope . k_rope is shared: it adds
to the scores exactly as concatenating [k_nope, k_rope] per head would, without broadcasting
k_rope over heads.

Absorbed weights. The absorbed and flash paths multiply per head by W_UK and W_UV, a dot with
the head axis as its batch axis; in kv_b_proj's layout [C,H,N+V] that axis is in the middle, and
XLA transposes (copies) both halves on every call, which on XLA:CPU costs a decode step more
than all of the layer's other weights together (docs/decode.md). `absorbed_weights(config, params)`
makes W_UK [H,N,C] and W_UV [H,C,V] once, head-major, as the variable collection "absorbed";
apply with {"params": params, "absorbed": absorbed} and those paths read them as they lie (as
inference engines do at load time: vLLM's MLA splits kv_b_proj after loading). Without the
collection the layer derives them from kv_b_proj per call: same numbers, slower.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mla_jax.cache import LatentCache, encode_latent, latent_operand, latent_values, write_cache
from mla_jax.config.model import ModelConfig
from mla_jax.paged_cache import PagedLayerCache, as_contiguous, write_paged
from mla_jax.kernels import mla_decode as kernels
from mla_jax.kernels.mla_decode import default_block_size, uses_pallas
from mla_jax.layers.flash_attention import flash_attention
from mla_jax.layers.flash_decode import mla_decode_partials, normalize, split_over_sequence
from mla_jax.layers.masking import (masked_softmax, query_positions, reference_context,
                                    resolve_attn_impl)
from mla_jax.layers.norms import rms_norm
from mla_jax.layers.paged_attention import pages_per_block, paged_mla_decode_partials
from mla_jax.layers.params import ParamSpecs, cast, declare, norm_specs, projection
from mla_jax.layers.precision import einsum_f32
from mla_jax.layers.rope import apply_rope, rope_cos_sin
from mla_jax.sharding import sequence_split


def split_kv_b_proj(w_kv_b: jax.Array, nope_dim: int) -> tuple[jax.Array, jax.Array]:
  """kv_b_proj [...,C,H,N+V] -> W_UK [...,H,N,C], W_UV [...,H,C,V] (head-major; any leading axes,
  e.g. the scan layout's layer axis)."""
  w_uk = jnp.moveaxis(w_kv_b[..., :nope_dim], -3, -1)  # [...,H,N,C]
  w_uv = jnp.swapaxes(w_kv_b[..., nope_dim:], -3, -2)  # [...,H,C,V]
  return w_uk, w_uv


def mla_absorbed_weights(config: ModelConfig, params: dict) -> dict:
  """absorbed_weights for a config whose layers are MultiHeadLatentAttention (the MLA kind's
  registry entry): the checks and the split, with no kind check."""
  if set(params) == {"params"}:
    raise ValueError("absorbed_weights got a variables dict {'params': ...}: pass the parameter "
                     "tree itself (variables['params'])")
  c, h = config.kv_lora_rank, config.num_heads
  expected = (c, h, config.qk_nope_head_dim + config.v_head_dim)
  found: list[int] = []  # the rank of every kv_b_proj: 3 unrolled, 4 stacked (scan layout)

  def walk(tree: dict, path: str) -> dict:
    out = {}
    for name, value in tree.items():
      if name == "kv_b_proj":
        if tuple(value.shape[-3:]) != expected or value.ndim not in (3, 4):
          raise ValueError(f"params{path}/kv_b_proj has shape {tuple(value.shape)}: expected "
                           f"[...,{c},{h},{expected[2]}] (kv_lora_rank, num_heads, "
                           "qk_nope_head_dim + v_head_dim) for this config")
        found.append(value.ndim)
        w_uk, w_uv = split_kv_b_proj(jnp.asarray(value).astype(config.dtype),
                                     config.qk_nope_head_dim)
        out["w_uk"], out["w_uv"] = w_uk, w_uv
      elif isinstance(value, dict) or hasattr(value, "items"):
        sub = walk(value, f"{path}/{name}")
        if sub:
          out[name] = sub
    return out

  absorbed = walk(params, "")
  if not found:
    raise ValueError("params hold no kv_b_proj, but the config's attention is MLA: they are "
                     "not this config's model")
  stacked = 4 in found
  if stacked != bool(config.scan_layers):
    layout = "the scan layout (stacked layers)" if stacked else "the unrolled layout"
    raise ValueError(f"params are in {layout} but model.scan_layers is "
                     f"{bool(config.scan_layers)}: convert them with "
                     f"mla_jax.model.{'unstack' if stacked else 'stack'}_layers or use the config "
                     "they were made for")
  return absorbed


def per_head(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [B,T,H,I] times a head-major weight w [H,I,O] -> [B,T,H,O] ("BTHI,HIO->BTHO"), as one
  batched dot over heads with B*T rows each: written out because XLA's CPU compiler turned that
  einsum over [B,T,H,I] into a slower program at B*T > 1 (docs/decode.md)."""
  b, t, h, i = x.shape
  rows = jnp.swapaxes(x.reshape(b * t, h, i), 0, 1)  # [H,B*T,I]
  out = jnp.einsum("HMI,HIO->HMO", rows, w)  # [H,B*T,O]
  return jnp.swapaxes(out, 0, 1).reshape(b, t, h, w.shape[-1])


def mla_specs(config: ModelConfig) -> ParamSpecs:
  """MLA's weights (Hugging Face's names, input axes first): q_proj [D,H,N+R], or with
  q_lora_rank Q the bottleneck q_a_proj [D,Q], q_a_layernorm, q_b_proj [Q,H,N+R]; then
  kv_a_proj_with_mqa [D,C+R], kv_a_layernorm [C], kv_b_proj [C,H,N+V], o_proj [H,V,D]."""
  cfg = config
  d, h, n, r, v, c = (cfg.hidden_size, cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                      cfg.v_head_dim, cfg.kv_lora_rank)
  specs: ParamSpecs = {}
  if cfg.q_lora_rank is None:
    specs["q_proj"] = projection(cfg, (d, h, n + r), ("embed", "heads", "head_dim"))
  else:
    specs["q_a_proj"] = projection(cfg, (d, cfg.q_lora_rank), ("embed", "q_lora"))
    specs["q_a_layernorm"] = norm_specs(cfg.q_lora_rank, cfg.param_dtype)
    specs["q_b_proj"] = projection(cfg, (cfg.q_lora_rank, h, n + r), ("q_lora", "heads", "head_dim"))
  specs["kv_a_proj_with_mqa"] = projection(cfg, (d, c + r), ("embed", "kv_lora"))
  specs["kv_a_layernorm"] = norm_specs(c, cfg.param_dtype)
  specs["kv_b_proj"] = projection(cfg, (c, h, n + v), ("kv_lora", "heads", "head_dim"))
  specs["o_proj"] = projection(cfg, (h, v, d), ("heads", "head_dim", "embed"))
  return specs


Record = Callable[[str, jax.Array], None]


def _no_record(name: str, value: jax.Array) -> None:
  del name, value


def mla_attention(config: ModelConfig, params: dict, x: jax.Array, *,
                  cache: Optional[LatentCache] = None, lengths: Optional[jax.Array] = None,
                  num_tokens: Optional[jax.Array] = None, attn_impl: str = "auto",
                  absorbed: Optional[dict] = None, record: Record = _no_record
                  ) -> tuple[jax.Array, Optional[LatentCache]]:
  """MLA as a pure function: x [B,T,D] -> (y [B,T,D], updated LatentCache or None).

  params: the tree of mla_specs (arrays). cache: this layer's LatentCache [B,S,...]; lengths
  [B]: tokens already in it (required with a cache); num_tokens [B]: real tokens among the T new
  ones (default all T; the rest is right padding of a ragged batch, never attended to later).
  absorbed: {"w_uk" [H,N,C], "w_uv" [H,C,V]} from absorbed_weights, else they are split out of
  kv_b_proj per call. record(name, tensor) sees the intermediates (q_lat, probs, ...).
  Raises ValueError for an unknown attn_impl, a cache without lengths, or absorbed weights of
  another shape.
  """
  cfg = config
  b, t, d = x.shape
  n, c = cfg.qk_nope_head_dim, cfg.kv_lora_rank
  impl = resolve_attn_impl(attn_impl, t, cache is not None)
  dtype = jnp.dtype(cfg.dtype)
  x = x.astype(dtype)
  positions, num_tokens = query_positions(b, t, cache is not None, lengths, num_tokens)  # [B,T]
  cos, sin = rope_cos_sin(positions, cfg)  # [B,T,R/2] each

  # Queries: optionally through their own low-rank bottleneck Q (DeepSeek-V2/V3; not V2-Lite).
  if cfg.q_lora_rank is None:
    q = jnp.einsum("BTD,DHK->BTHK", x, cast(params["q_proj"], cfg))
  else:
    q_a = jnp.einsum("BTD,DQ->BTQ", x, cast(params["q_a_proj"], cfg))
    q_a = rms_norm(params["q_a_layernorm"], q_a, cfg.latent_norm_eps, dtype)
    q = jnp.einsum("BTQ,QHK->BTHK", q_a, cast(params["q_b_proj"], cfg))
  q_nope, q_rope = jnp.split(q, [n], axis=-1)  # [B,T,H,N], [B,T,H,R]
  q_rope = apply_rope(q_rope, cos, sin, cfg.rope_interleave)

  # The latent and the shared RoPE key: all that is cached.
  kv_a = jnp.einsum("BTD,DM->BTM", x, cast(params["kv_a_proj_with_mqa"], cfg))  # M=C+R
  c_kv, k_rope = jnp.split(kv_a, [c], axis=-1)  # [B,T,C], [B,T,R]
  c_kv = rms_norm(params["kv_a_layernorm"], c_kv, cfg.latent_norm_eps, dtype)
  k_rope = apply_rope(k_rope[:, :, None], cos, sin, cfg.rope_interleave)[:, :, 0]
  for name, value in (("q_nope", q_nope), ("q_rope", q_rope), ("c_kv", c_kv), ("k_rope", k_rope)):
    record(name, value)

  new = LatentCache(c_kv=c_kv, k_rope=k_rope)
  if cache is None:
    new_cache = None
  elif isinstance(cache, PagedLayerCache):  # written through the page table
    new_cache = write_paged(encode_latent(new, cache.pool), cache, lengths, num_tokens)
  else:
    new_cache = write_cache(encode_latent(new, cache), cache, lengths)
  w_kv_b = cast(params["kv_b_proj"], cfg)  # [C,H,N+V]

  if impl == "flash":
    w_uk, w_uv = _absorbed(cfg, w_kv_b, absorbed)  # [H,N,C], [H,C,V]
    q_lat = per_head(q_nope, w_uk)  # BTHN,HNC->BTHC
    out_lat = _flash(cfg, q_lat, q_rope, new if cache is None else new_cache, lengths,
                     num_tokens, positions).astype(dtype)  # [B,T,H,C]
    out = per_head(out_lat, w_uv)  # BTHC,HCV->BTHV
    record("q_lat", q_lat)
    record("out_lat", out_lat)
  elif impl == "flash_attention":  # the naive math in blocks, linear memory (flash_attention.py)
    keys = new if new_cache is None else _cached_values(new_cache)  # slots zeroed per block
    k_nope, values = _expand(keys.c_kv.astype(dtype), w_kv_b, n)  # [B,S,H,N], [B,S,H,V]
    out = flash_attention(
        q_nope, k_nope, values, q_rope=q_rope, k_rope=keys.k_rope.astype(dtype),
        scale=cfg.softmax_scale, query_offsets=None if cache is None else lengths,
        kv_lengths=None if cache is None else lengths + num_tokens, block_q=cfg.flash_block_q,
        block_k=cfg.flash_block_k).astype(dtype)
    record("k_nope", k_nope)
    record("values", values)
  else:
    cached = None if new_cache is None else _cached_values(new_cache)
    keys, mask = reference_context(new, cached, lengths, num_tokens, positions, dtype)
    c_all, k_rope_all = keys.c_kv, keys.k_rope  # [B,S,C], [B,S,R]
    rope_scores = einsum_f32("BTHR,BSR->BHTS", q_rope, k_rope_all)
    if impl == "naive":
      k_nope, values = _expand(c_all, w_kv_b, n)  # [B,S,H,N], [B,S,H,V]
      nope_scores = einsum_f32("BTHN,BSHN->BHTS", q_nope, k_nope)
      probs = masked_softmax((nope_scores + rope_scores) * cfg.softmax_scale, mask)
      out = einsum_f32("BHTS,BSHV->BTHV", probs.astype(dtype), values).astype(dtype)
      record("k_nope", k_nope)
      record("values", values)
    else:
      w_uk, w_uv = _absorbed(cfg, w_kv_b, absorbed)  # [H,N,C], [H,C,V]
      q_lat = per_head(q_nope, w_uk)  # BTHN,HNC->BTHC
      nope_scores = einsum_f32("BTHC,BSC->BHTS", q_lat, c_all)
      probs = masked_softmax((nope_scores + rope_scores) * cfg.softmax_scale, mask)
      out_lat = einsum_f32("BHTS,BSC->BTHC", probs.astype(dtype), c_all).astype(dtype)
      out = per_head(out_lat, w_uv)  # BTHC,HCV->BTHV
      record("q_lat", q_lat)
      record("out_lat", out_lat)
    record("probs", probs)

  y = jnp.einsum("BTHV,HVD->BTD", out, cast(params["o_proj"], cfg))
  record("attn_out", out)
  return y, new_cache


def _expand(c_kv: jax.Array, w_kv_b: jax.Array, nope_dim: int) -> tuple[jax.Array, jax.Array]:
  """The naive up-projection of latents c_kv [B,S,C] by kv_b_proj [C,H,N+V]: per-head keys
  k_nope [B,S,H,N] and values [B,S,H,V] (plain matmuls, no absorbed weights)."""
  k_nope = jnp.einsum("BSC,CHN->BSHN", c_kv, w_kv_b[..., :nope_dim])
  values = jnp.einsum("BSC,CHV->BSHV", c_kv, w_kv_b[..., nope_dim:])
  return k_nope, values


def _cached_values(cache) -> LatentCache:
  """The updated cache as float32 values [B,S,...] (paged: gathered; quantized: decoded): a
  whole-cache copy, for the paths that read the whole cache (reference, flash attention)."""
  return latent_values(as_contiguous(cache) if isinstance(cache, PagedLayerCache) else cache)


def _absorbed(cfg: ModelConfig, w_kv_b: jax.Array, absorbed: Optional[dict]
              ) -> tuple[jax.Array, jax.Array]:
  """W_UK [H,N,C] and W_UV [H,C,V] in the compute dtype: the caller's absorbed weights
  (absorbed_weights) when given, else transposed out of kv_b_proj [C,H,N+V] here."""
  if absorbed is None:
    return split_kv_b_proj(w_kv_b, cfg.qk_nope_head_dim)
  w_uk, w_uv = absorbed["w_uk"], absorbed["w_uv"]
  h, n, v, c = cfg.num_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
  if w_uk.shape != (h, n, c) or w_uv.shape != (h, c, v):
    raise ValueError(f"the 'absorbed' collection's w_uk {tuple(w_uk.shape)} / w_uv "
                     f"{tuple(w_uv.shape)} do not fit this layer (expected ({h}, {n}, {c}) "
                     f"/ ({h}, {c}, {v})): make it with absorbed_weights(config, params) "
                     "for this model")
  return cast(w_uk, cfg), cast(w_uv, cfg)


def _flash(cfg: ModelConfig, q_lat, q_rope, keys: LatentCache, lengths, num_tokens,
           positions) -> jax.Array:
  """Flash-decoding over `keys` (the updated cache, or without one the new entries): out_lat
  [B,T,H,C] float32, by XLA's loop or the Pallas kernel (model.decode_kernel). A cache split
  over the mesh's sequence axis is walked shard by shard; a paged one page by page through its
  table."""
  b, t = positions.shape
  kv_lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths + num_tokens
  kernel = uses_pallas(cfg.decode_kernel)
  block_size = cfg.decode_block_size
  options = {}
  if kernel:
    block_size = cfg.decode_kernel_block_size or default_block_size()
    options = {"num_splits": cfg.decode_kv_splits}
  if isinstance(keys, PagedLayerCache):
    latent, decode_block = latent_operand(keys.pool)
    paged = kernels.paged_mla_decode_partials if kernel else paged_mla_decode_partials
    return normalize(*paged(
        q_lat, q_rope, latent, keys.pool.k_rope, keys.page_table, kv_lengths, positions,
        scale=cfg.softmax_scale, dequantize=decode_block,
        pages_per_block=pages_per_block(block_size, keys.page_size), **options)[1:])
  latent, decode_block = latent_operand(keys)  # a quantized latent is decoded per block
  partials = functools.partial(kernels.mla_decode_partials if kernel else mla_decode_partials,
                               scale=cfg.softmax_scale, block_size=block_size,
                               dequantize=decode_block, **options)
  split = sequence_split() if lengths is not None else None
  if split is None:
    return normalize(*partials(q_lat, q_rope, latent, keys.k_rope, kv_lengths, positions)[1:])
  return split_over_sequence(partials, (q_lat, q_rope), (latent, keys.k_rope), kv_lengths,
                             positions, **split)


class MultiHeadLatentAttention(nn.Module):
  """x [B,T,D] -> (y [B,T,D], updated LatentCache or None): mla_attention as a Linen module.

  cache: this layer's LatentCache [B,S,...]; lengths [B]: tokens already in it (required with a
  cache); num_tokens [B]: real tokens among the T new ones (default all T; the rest is right
  padding of a ragged batch and is never attended to later). Under flax's
  nn.logical_axis_rules the parameters are boxed with their logical axes (layers/params.py); the "absorbed" collection, when given, holds W_UK and W_UV;
  intermediates are sown for inspection (apply with mutable=['intermediates']).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, *, cache: Optional[LatentCache] = None,
               lengths: Optional[jax.Array] = None, num_tokens: Optional[jax.Array] = None,
               attn_impl: str = "auto") -> tuple[jax.Array, Optional[LatentCache]]:
    params = declare(self, mla_specs(self.config))
    absorbed = None
    if self.has_variable("absorbed", "w_uk"):
      absorbed = {name: self.get_variable("absorbed", name) for name in ("w_uk", "w_uv")}
    return mla_attention(self.config, params, x, cache=cache, lengths=lengths,
                         num_tokens=num_tokens, attn_impl=attn_impl, absorbed=absorbed,
                         record=lambda name, value: self.sow("intermediates", name, value))
