"""What a query may attend to, shared by MLA and the baselines so both mask identically.

Without a cache: plain causal attention over the T new tokens. With a cache: the new tokens go at
slots lengths[b] .. (written by cache.write_cache), query t sits at absolute position
lengths[b] + t and sees slots <= its position that hold real tokens.

Two ways to attend over a cache. The flash-decoding path (layers/flash_decode.py) walks the cache
block by block and stops at the longest sequence. The reference paths ('naive', 'absorbed') read
the whole cache through `reference_context`, which zeroes the slots that hold no token (so a NaN
left there cannot leak through 0 * NaN) in a whole-cache copy: simple and obviously right, the
yardstick the flash path is tested against, and not what a decode step should cost.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from mla_jax.cache import Entries, slot_mask

ATTN_IMPLS = ("naive", "absorbed", "flash", "flash_attention", "auto")

# From this many new tokens on, 'auto' without a cache (training, a forward pass) and generate's
# prefill run flash attention rather than the naive path: the shortest length at which the
# blocked path's training step and prefill were both faster than the naive ones, at batch 1 and
# batch 16, on a CPU (`mla-jax bench train`'s naive-against-flash table, docs/flash-attention.md).
# Below it the naive path's few large dots are as fast or faster, and its program compiles
# faster.
FLASH_ATTENTION_MIN_TOKENS = 128


def resolve_attn_impl(attn_impl: str, num_new_tokens: int, has_cache: bool) -> str:
  """'auto' is, without a cache (training, a forward pass), 'flash_attention' from
  FLASH_ATTENTION_MIN_TOKENS new tokens on and 'naive' below; with a cache, 'flash' (decode
  steps, and prefill or chunked prefill into a cache: the blocked absorbed path reads only the
  filled slots).

  'flash_attention' is the naive math blocked, with its own backward pass, in memory linear in
  T (layers/flash_attention.py): for training and prefill; 'naive' and 'absorbed' are the plain
  einsum paths over the whole cache, kept as references. Decided from static shapes, never from
  array values, so it costs no retrace under jit.
  """
  if attn_impl not in ATTN_IMPLS:
    raise ValueError(f"attn_impl={attn_impl!r} is invalid: allowed {', '.join(ATTN_IMPLS)}")
  if attn_impl != "auto":
    return attn_impl
  if has_cache:
    return "flash"
  return prefill_attn_impl(num_new_tokens)


def prefill_attn_impl(num_new_tokens: int) -> str:
  """The path for a forward pass over `num_new_tokens` tokens at once (training, or generate's
  prefill of a prompt): 'flash_attention' from FLASH_ATTENTION_MIN_TOKENS on, else 'naive'."""
  return "flash_attention" if num_new_tokens >= FLASH_ATTENTION_MIN_TOKENS else "naive"


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


def reference_context(new: Entries, updated: Optional[Entries], lengths: Optional[jax.Array],
                      num_tokens: Optional[jax.Array], positions: jax.Array, dtype
                      ) -> tuple[Entries, jax.Array]:
  """For the reference paths: (keys/values to attend to as `dtype`, mask [B,T,S] or [1,T,T]).

  new: this step's entries (T tokens on their seq_axis); updated: the cache after write_cache
  as float values (dequantized, widened), or None for no cache; lengths [B]: tokens cached before this step;
  num_tokens [B]: real tokens among the T new ones. Slots that hold no token come back zeroed,
  in a whole-cache copy.
  """
  t = positions.shape[1]
  if updated is None:
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # [T,S=T]
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), new), causal[None]  # [1,T,T]
  axis = updated.seq_axis
  max_len = jax.tree_util.tree_leaves(updated)[0].shape[axis]
  holds_token = slot_mask(lengths + num_tokens, max_len)  # [B,S]

  def visible(buf: jax.Array) -> jax.Array:  # as dtype, unused slots zeroed
    b = holds_token.shape[0]  # the [B,S] mask broadcast over the axes around S
    keep = holds_token.reshape((b,) + (1,) * (axis - 1) + (max_len,)
                               + (1,) * (buf.ndim - axis - 1))
    return jnp.where(keep, buf, jnp.zeros((), buf.dtype)).astype(dtype)

  # Causal alone suffices: a real query's position is below its sequence's new length.
  causal = jnp.arange(max_len)[None, None, :] <= positions[:, :, None]  # [B,T,S]
  return jax.tree_util.tree_map(visible, updated), causal


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """softmax over S of float32 scores [B,H,T,S] where mask [B,T,S] allows; float32 out.

  Masked scores get the most negative finite float, not -inf, so a row with nothing visible
  (a padding query) gives finite weights over zeroed slots rather than NaN.
  """
  scores = scores.astype(jnp.float32)
  scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores, axis=-1)
