"""What a query may attend to, shared by MLA and the baselines so both mask identically.

Without a cache: plain causal attention over the T new tokens. With a cache: the new tokens go at
slots lengths[b] .., query t sits at absolute position lengths[b] + t and sees slots <= its
position that hold real tokens. Slots that hold none are also zeroed before use, so a NaN left in
an unused slot cannot leak through 0 * NaN in the probability-weighted sum.
"""

from __future__ import annotations

from typing import Optional, TypeVar

import jax
import jax.numpy as jnp

from mla_jax.cache import slot_mask, write_tokens

ATTN_IMPLS = ("naive", "absorbed", "auto")
Entries = TypeVar("Entries")  # a LatentCache or KVCache, of [B,T,...] or [B,S,...] arrays


def resolve_attn_impl(attn_impl: str, num_new_tokens: int, has_cache: bool) -> str:
  """'auto' is naive for training and prefill (T > 1), absorbed for one-token decode steps.

  Decided from static shapes, never from array values, so it costs no retrace under jit.
  """
  if attn_impl not in ATTN_IMPLS:
    raise ValueError(f"attn_impl={attn_impl!r} is invalid: allowed {', '.join(ATTN_IMPLS)}")
  if attn_impl != "auto":
    return attn_impl
  return "absorbed" if has_cache and num_new_tokens == 1 else "naive"


def query_positions(batch: int, num_new: int, has_cache: bool, lengths: Optional[jax.Array],
                    num_tokens: Optional[jax.Array]) -> tuple[jax.Array, Optional[jax.Array]]:
  """Absolute positions [B,T] of the new tokens (after each sequence's cached ones), and
  num_tokens [B] defaulted to all T when a cache is given; checks the cache arguments."""
  offsets = jnp.arange(num_new, dtype=jnp.int32)[None, :]  # [1,T]
  if not has_cache:
    return jnp.broadcast_to(offsets, (batch, num_new)), None
  if lengths is None:
    raise ValueError("lengths is required with a cache: tokens already cached per sequence [B]")
  if num_tokens is None:
    num_tokens = jnp.full((batch,), num_new, jnp.int32)
  return lengths[:, None].astype(jnp.int32) + offsets, num_tokens


def attention_context(new: Entries, cache: Optional[Entries], lengths: Optional[jax.Array],
                      num_tokens: Optional[jax.Array], positions: jax.Array
                      ) -> tuple[Optional[Entries], Entries, jax.Array]:
  """Returns (updated cache or None, keys/values to attend to, mask [B,T,S]).

  new: this step's entries [B,T,...]; cache: entries [B,S,...]; lengths [B]: tokens already
  cached; num_tokens [B]: how many of the T new tokens are real (the rest is right padding).
  """
  t = positions.shape[1]
  if cache is None:
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # [T,S=T]
    return None, new, causal[None]  # [1,T,T]
  updated = jax.tree_util.tree_map(lambda buf, x: write_tokens(buf, x, lengths), cache, new)
  max_len = jax.tree_util.tree_leaves(cache)[0].shape[1]
  holds_token = slot_mask(lengths + num_tokens, max_len)  # [B,S]

  def visible(buf: jax.Array) -> jax.Array:  # [B,S,...], unused slots zeroed
    keep = holds_token.reshape(holds_token.shape + (1,) * (buf.ndim - 2))
    return jnp.where(keep, buf, jnp.zeros((), buf.dtype))

  # Causal alone suffices: a real query's position is below its sequence's new length.
  causal = jnp.arange(max_len)[None, None, :] <= positions[:, :, None]  # [B,T,S]
  return updated, jax.tree_util.tree_map(visible, updated), causal


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """softmax over S of float32 scores [B,H,T,S] where mask [B,T,S] allows; float32 out.

  Masked scores get the most negative finite float, not -inf, so a row with nothing visible
  (a padding query) gives finite weights over zeroed slots rather than NaN.
  """
  scores = scores.astype(jnp.float32)
  scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores, axis=-1)
