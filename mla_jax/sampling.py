"""Autoregressive generation: one jitted prefill (naive path) and one compiled decode loop
(lax.scan over flash-decoding steps, cache donated), with greedy, temperature, top-k and top-p
sampling. `generate` makes no host round trip per token; `stream` does, to print as it goes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax.cache import Cache, init_cache
from mla_jax.model import Transformer


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How to pick the next token from logits [B,V]; hashable, so it is a static jit argument."""

  temperature: float = 0.0  # 0 = greedy (argmax)
  top_k: Optional[int] = None
  top_p: Optional[float] = None

  def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:  # [B,V] -> [B] int32
    logits = logits.astype(jnp.float32)
    if self.temperature == 0.0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / self.temperature
    lowest = jnp.finfo(jnp.float32).min
    if self.top_k is not None:
      kth = jax.lax.top_k(logits, self.top_k)[0][:, -1:]  # [B,1]
      logits = jnp.where(logits < kth, lowest, logits)
    if self.top_p is not None:
      order = jnp.argsort(-logits, axis=-1)  # [B,V] most likely first
      sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
      before = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1) - jax.nn.softmax(
          sorted_logits, axis=-1)  # mass strictly before each token
      keep_sorted = before < self.top_p  # the smallest prefix reaching top_p; top-1 always kept
      keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
          keep_sorted)
      logits = jnp.where(keep, logits, lowest)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def check_sampling(vocab_size: int, max_new_tokens: int, temperature: float, top_k: Optional[int],
                    top_p: Optional[float], eos_id: Optional[int]) -> None:
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: must be a positive integer")
  if not isinstance(temperature, (int, float)) or temperature < 0:
    raise ValueError(f"temperature={temperature!r} is invalid: must be >= 0 (0 = greedy)")
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                            or not 1 <= top_k <= vocab_size):
    raise ValueError(f"top_k={top_k!r} is invalid: must be in [1, vocab_size={vocab_size}]")
  if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
    raise ValueError(f"top_p={top_p!r} is invalid: must be in (0, 1]")
  if eos_id is not None and not 0 <= eos_id < vocab_size:
    raise ValueError(f"eos_id={eos_id!r} is invalid: must be in [0, vocab_size={vocab_size})")


def _prompt_rows(prompts: Union[Sequence[Sequence[int]], np.ndarray, jax.Array],
                 vocab_size: int) -> list[np.ndarray]:
  if isinstance(prompts, (np.ndarray, jax.Array)):
    array = np.asarray(prompts)
    if array.ndim != 2:
      raise ValueError(f"prompts array must be [B,T], got shape {array.shape}")
    rows = list(array)
  else:
    rows = [np.asarray(list(p)) for p in prompts]
  if not rows:
    raise ValueError("prompts is empty: give at least one prompt")
  for i, row in enumerate(rows):
    if row.size == 0:
      raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    if not np.issubdtype(row.dtype, np.integer):
      raise ValueError(f"prompt {i} must hold integer token ids, got {row.dtype}")
    if row.min() < 0 or row.max() >= vocab_size:
      raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={vocab_size})")
  return [row.astype(np.int32) for row in rows]


@functools.partial(jax.jit, static_argnames=("model", "max_len", "sampler"))
def _prefill(params, prompt: jax.Array, lengths: jax.Array, key: jax.Array, *, model: Transformer,
             max_len: int, sampler: Sampler) -> tuple[jax.Array, Cache]:
  """Runs each whole prompt (naive path) and samples the first new token: [B], cache."""
  cache = init_cache(model.config, prompt.shape[0], max_len)
  logits, cache = model.apply({"params": params}, prompt, cache=cache, num_tokens=lengths,
                              attn_impl="naive")  # [B,P,V]
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B,V]
  return sampler(last, key), cache


def decode_token(model: Transformer, params, token: jax.Array, cache: Cache, key: jax.Array,
                 sampler: Sampler) -> tuple[jax.Array, Cache]:
  """One decode step on the flash-decoding path (blocked, absorbed, up to the longest sequence):
  token [B] -> next token [B], cache one longer. Traced once per compiled generation loop (tests
  count it)."""
  logits, cache = model.apply({"params": params}, token[:, None], cache=cache,
                              attn_impl="flash")  # [B,1,V]
  return sampler(logits[:, 0], key), cache


@functools.partial(jax.jit, static_argnames=("model", "sampler", "eos_id", "pad_id"),
                   donate_argnames=("cache",))
def _decode_loop(params, first: jax.Array, cache: Cache, keys: jax.Array, *, model: Transformer,
                 sampler: Sampler, eos_id: Optional[int], pad_id: int) -> tuple[jax.Array, Cache]:
  """Feeds each sampled token back through one flash-decoding step: tokens [B, 1 + len(keys)],
  and the cache, returned so the donated input buffers are updated in place."""

  def finished(token: jax.Array) -> jax.Array:
    return jnp.zeros(token.shape, bool) if eos_id is None else token == eos_id

  def step(carry, key):
    cache, token, done = carry  # token [B]: the last one sampled; done [B]: EOS already out
    nxt, cache = decode_token(model, params, token, cache, key, sampler)
    nxt = jnp.where(done, pad_id, nxt)
    return (cache, nxt, done | finished(nxt)), nxt

  (cache, _, _), rest = jax.lax.scan(step, (cache, first, finished(first)), keys)  # rest [N-1,B]
  return jnp.concatenate([first[:, None], rest.T], axis=1), cache


@functools.partial(jax.jit, static_argnames=("model", "sampler"), donate_argnames=("cache",))
def _decode_step(params, token: jax.Array, cache: Cache, key: jax.Array, *, model: Transformer,
                 sampler: Sampler) -> tuple[jax.Array, Cache]:
  """decode_token, compiled alone for host-loop streaming."""
  return decode_token(model, params, token, cache, key, sampler)


def stream(model: Transformer, params, prompt: Sequence[int], *, max_new_tokens: int,
           temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
           eos_id: Optional[int] = None, seed: int = 0) -> Iterator[int]:
  """Yields one prompt's new tokens as they are sampled (one host round trip per token: for
  interactive output; `generate` runs the whole loop on the device). Same keys, same tokens.
  Validation and compilation happen in this call; the returned iterator only runs."""
  cfg = model.config
  check_sampling(cfg.vocab_size, max_new_tokens, temperature, top_k, top_p, eos_id)
  (row,) = _prompt_rows([prompt], cfg.vocab_size)
  max_len = cache_length(len(row), max_new_tokens, cfg.max_seq_len)
  sampler = Sampler(float(temperature), top_k, None if top_p is None else float(top_p))
  keys = jax.random.split(jax.random.key(seed), max_new_tokens)

  # Compile both programs now (ahead of time), so the caller can time them apart from decoding.
  prompt_ids, lengths = jnp.asarray(row[None]), jnp.asarray([len(row)], jnp.int32)
  prefill = _prefill.lower(params, prompt_ids, lengths, keys[0], model=model, max_len=max_len,
                           sampler=sampler).compile()
  first_token, cache_shape = prefill.out_info
  step = _decode_step.lower(params, first_token, cache_shape, keys[0], model=model,
                            sampler=sampler).compile()

  def tokens() -> Iterator[int]:
    token, cache = prefill(params, prompt_ids, lengths, keys[0])
    for i in range(max_new_tokens):
      value = int(token[0])
      yield value
      if value == eos_id or i + 1 == max_new_tokens:
        return
      token, cache = step(params, token, cache, keys[i + 1])

  return tokens()


def cache_length(longest_prompt: int, max_new_tokens: int, max_seq_len: int) -> int:
  """Longest prompt + max_new_tokens, refused past the model's max_seq_len before any compute."""
  total = longest_prompt + max_new_tokens
  if total > max_seq_len:
    raise ValueError(f"longest prompt ({longest_prompt} tokens) + max_new_tokens ({max_new_tokens})"
                     f" = {total} exceeds model.max_seq_len ({max_seq_len})")
  return total


def generate(model: Transformer, params, prompts, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_id: Optional[int] = None, seed: int = 0, pad_id: int = 0,
             return_lengths: bool = False):
  """Continues each prompt by max_new_tokens tokens.

  prompts: token lists of any lengths, or an int array [B,T]. Returns int32 [B, L] with
  L = longest prompt + max_new_tokens: row b is prompt b, then its new tokens, then pad_id (after
  an EOS, and for shorter prompts). With return_lengths, also each row's real length [B].
  """
  cfg = model.config
  check_sampling(cfg.vocab_size, max_new_tokens, temperature, top_k, top_p, eos_id)
  rows = _prompt_rows(prompts, cfg.vocab_size)
  prompt_lengths = np.array([len(r) for r in rows], np.int32)
  longest = int(prompt_lengths.max())
  max_len = cache_length(longest, max_new_tokens, cfg.max_seq_len)
  padded = np.full((len(rows), longest), pad_id, np.int32)
  for b, row in enumerate(rows):
    padded[b, :len(row)] = row

  sampler = Sampler(float(temperature), top_k, None if top_p is None else float(top_p))
  keys = jax.random.split(jax.random.key(seed), max_new_tokens)
  first, cache = _prefill(params, jnp.asarray(padded), jnp.asarray(prompt_lengths), keys[0],
                          model=model, max_len=max_len, sampler=sampler)
  new, _ = _decode_loop(params, first, cache, keys[1:], model=model, sampler=sampler,
                        eos_id=eos_id, pad_id=pad_id)
  new = np.asarray(new)  # [B,N]

  generated = np.full((len(rows),), max_new_tokens, np.int32)
  if eos_id is not None:
    hit = new == eos_id
    generated = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, max_new_tokens).astype(np.int32)
  out = np.full((len(rows), max_len), pad_id, np.int32)
  for b, row in enumerate(rows):
    out[b, :len(row)] = row
    out[b, len(row):len(row) + generated[b]] = new[b, :generated[b]]
  if return_lengths:
    return out, prompt_lengths + generated
  return out
