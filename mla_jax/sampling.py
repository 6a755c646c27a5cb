"""Autoregressive generation: one jitted prefill (naive path, or flash attention for long
prompts) and one compiled decode loop (lax.scan over flash-decoding steps, cache donated), with
greedy, temperature, top-k and top-p sampling. `generate` makes no host round trip per token;
`stream` does, to print as it goes.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Iterable, Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax.cache import Cache
from mla_jax.kinds import absorbed_weights, init_cache
from mla_jax.layers.masking import prefill_attn_impl
from mla_jax.layers.params import unbox
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


def _is_integer(value) -> bool:
  """A Python or NumPy integer, not a bool (True is an int to Python, never a token id or seed)."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
  """A finite real number (Python or NumPy, not a bool): NaN and inf sample nothing sensible."""
  return (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, (bool, np.bool_)) and bool(np.isfinite(value)))


def check_token_id(name: str, value, vocab_size: int) -> None:
  """Raises ValueError unless `value` is an integer id in [0, vocab_size) (eos_id, pad_id)."""
  if not _is_integer(value) or not 0 <= value < vocab_size:
    raise ValueError(f"{name}={value!r} is invalid: must be an integer token id in [0, "
                     f"vocab_size={vocab_size})")


def check_seed(seed) -> None:
  """Raises ValueError unless `seed` is an integer (jax.random.key's seed)."""
  if not _is_integer(seed):
    raise ValueError(f"seed={seed!r} is invalid: must be an integer, e.g. seed=0 "
                     f"(got {type(seed).__name__})")


def check_sampling(vocab_size: int, max_new_tokens: int, temperature: float, top_k: Optional[int],
                    top_p: Optional[float], eos_id: Optional[int]) -> None:
  """Raises ValueError naming the first invalid option: max_new_tokens not a positive integer,
  temperature not a finite number >= 0, top_k not an integer in [1, vocab_size], top_p not a
  finite number in (0, 1], eos_id not a token id in [0, vocab_size)."""
  if not _is_integer(max_new_tokens) or max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: must be a positive integer")
  if not _is_number(temperature) or temperature < 0:
    raise ValueError(f"temperature={temperature!r} is invalid: must be a finite number >= 0 "
                     "(0 = greedy, 1 = the model's own distribution)")
  if top_k is not None and (not _is_integer(top_k) or not 1 <= top_k <= vocab_size):
    raise ValueError(f"top_k={top_k!r} is invalid: must be in [1, vocab_size={vocab_size}] (an "
                     "integer), or None for no top-k")
  if top_p is not None and not (_is_number(top_p) and 0 < top_p <= 1):
    raise ValueError(f"top_p={top_p!r} is invalid: must be in (0, 1] (a finite number), or None "
                     "for no top-p")
  if eos_id is not None:
    check_token_id("eos_id", eos_id, vocab_size)


_ARRAY_NEEDS_MASK = (
    "an array cannot say which of its tokens are padding: pass attention_mask= [B,T] (1 on real "
    "tokens, 0 on padding, left or right, as Hugging Face tokenizers return it) or lengths= [B] "
    "(the first lengths[b] tokens of row b are real); for rows without padding, lengths=[T] * B; "
    "or pass a list of token lists")


def _real_spans(shape: tuple[int, int], attention_mask, lengths) -> list[tuple[int, int]]:
  """[start, end) of each row's real tokens in a [B,T] prompt array, from exactly one of
  attention_mask [B,T] (contiguous ones: left or right padding) or lengths [B] (right padding)."""
  b, t = shape
  if (attention_mask is None) == (lengths is None):
    which = "neither" if attention_mask is None else "both"
    raise ValueError(f"prompts is an array of shape {shape} and {which} of attention_mask and "
                     f"lengths was given: {_ARRAY_NEEDS_MASK}")
  if lengths is not None:
    lengths = np.asarray(lengths)
    if lengths.shape != (b,) or not np.issubdtype(lengths.dtype, np.integer):
      raise ValueError(f"lengths must be an integer array [B={b}], got {lengths.dtype}"
                       f"{list(lengths.shape)}")
    if lengths.min() < 1 or lengths.max() > t:
      raise ValueError(f"lengths must be in [1, T={t}] (tokens per row, padding on the right), "
                       f"got {lengths.tolist()}")
    return [(0, int(n)) for n in lengths]
  mask = np.asarray(attention_mask)
  if mask.shape != (b, t):
    raise ValueError(f"attention_mask must have the prompts' shape {(b, t)}, got {mask.shape}")
  if not (mask.dtype == bool or np.issubdtype(mask.dtype, np.integer)) or not np.isin(
      mask, (0, 1)).all():
    raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
  spans = []
  for row, ones in enumerate(mask.astype(bool)):
    where = np.flatnonzero(ones)
    if where.size == 0:
      raise ValueError(f"attention_mask row {row} is all 0: every prompt needs at least one token")
    if where[-1] - where[0] + 1 != where.size:
      raise ValueError(f"attention_mask row {row} has padding between real tokens (ones at "
                       f"{where.tolist()}): only left or right padding can be told apart from "
                       "the prompt")
    spans.append((int(where[0]), int(where[-1]) + 1))
  return spans


_PROMPTS_SHAPE = ("prompts must be a list of token-id lists, one per prompt: [[5, 9, 2]] for one "
                  "prompt, [[5, 9, 2], [3]] for two")


def _prompt_list(prompts) -> list:
  """prompts as a list of per-prompt sequences; a flat list of ids (one prompt not wrapped in a
  list), a string or a non-sequence raises ValueError saying the shape expected."""
  if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
    raise ValueError(f"{_PROMPTS_SHAPE} (or an int array [B,T]); got {type(prompts).__name__}")
  items = list(prompts)
  if items and all(_is_integer(p) for p in items):
    raise ValueError(f"{_PROMPTS_SHAPE}; got a flat list of {len(items)} ints: for one prompt "
                     f"wrap it, generate(model, params, [prompt], ...)")
  return items


def _list_row(index: int, prompt, hint: str = _PROMPTS_SHAPE) -> np.ndarray:
  """One prompt as an array: an int array, or a sequence of integer ids. Anything else (a string,
  a number, a nested list) raises ValueError naming the prompt and ending with `hint`."""
  if isinstance(prompt, (np.ndarray, jax.Array)):
    return np.asarray(prompt)
  if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Iterable):
    raise ValueError(f"prompt {index} must be a sequence of token ids, got "
                     f"{type(prompt).__name__} {prompt!r:.40}: {hint}")
  prompt = list(prompt)
  for position, token in enumerate(prompt):
    if not _is_integer(token):
      raise ValueError(f"prompt {index} must hold integer token ids, got {token!r:.40} "
                       f"({type(token).__name__}) at position {position}: {hint}")
  return np.asarray(prompt, np.int64)


def _prompt_rows(prompts: Union[Sequence[Sequence[int]], np.ndarray, jax.Array], vocab_size: int,
                 attention_mask=None, lengths=None) -> list[np.ndarray]:
  """Each prompt's real tokens as int32 [T_b]; arrays need attention_mask or lengths."""
  if isinstance(prompts, (np.ndarray, jax.Array)):
    array = np.asarray(prompts)
    if array.ndim != 2:
      raise ValueError(f"prompts array must be [B,T], got shape {array.shape}")
    rows = [array[b, start:end] for b, (start, end) in
            enumerate(_real_spans(array.shape, attention_mask, lengths))]
  else:
    if attention_mask is not None or lengths is not None:
      raise ValueError("attention_mask and lengths go with a prompts array [B,T]; a list of token "
                       "lists already gives each prompt's length")
    rows = [_list_row(i, p) for i, p in enumerate(_prompt_list(prompts))]
  if not rows:
    raise ValueError("prompts is empty: give at least one prompt")
  for i, row in enumerate(rows):
    if row.ndim != 1:
      raise ValueError(f"prompt {i} must be a flat sequence of token ids, got nested values of "
                       f"shape {row.shape}: give prompts as [[id, id, ...], ...], one list per "
                       "prompt")
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
  """Runs each whole prompt and samples the first new token: [B], cache. Long prompts (from
  FLASH_ATTENTION_MIN_TOKENS) run flash attention, in memory linear in P; short ones the naive
  path (layers/masking.py: prefill_attn_impl)."""
  cache = init_cache(model.config, prompt.shape[0], max_len)
  logits, cache = model.apply({"params": params}, prompt, cache=cache, num_tokens=lengths,
                              attn_impl=prefill_attn_impl(prompt.shape[1]))  # [B,P,V]
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B,V]
  return sampler(last, key), cache


DECODE_ATTN_IMPL = "flash"  # the attention path generate's decode steps use


def decode_token(model: Transformer, params, token: jax.Array, cache: Cache, key: jax.Array,
                 sampler: Sampler, attn_impl: str = DECODE_ATTN_IMPL,
                 absorbed: Optional[dict] = None) -> tuple[jax.Array, Cache]:
  """One decode step, by default generate's flash-decoding path (blocked, absorbed, up to the
  longest sequence; attn_impl='absorbed' or 'naive' for the references the benchmark compares):
  token [B] -> next token [B], cache one longer. absorbed: absorbed_weights(config, params),
  made once (None: each step transposes W_UK and W_UV out of kv_b_proj).
  Traced once per compiled generation loop (tests count it)."""
  variables = {"params": params} if absorbed is None else {"params": params, "absorbed": absorbed}
  logits, cache = model.apply(variables, token[:, None], cache=cache,
                              attn_impl=attn_impl)  # [B,1,V]
  return sampler(logits[:, 0], key), cache


@functools.partial(jax.jit, static_argnames=("model", "sampler", "eos_id", "pad_id"),
                   donate_argnames=("cache",))
def _decode_loop(params, first: jax.Array, cache: Cache, keys: jax.Array, *, model: Transformer,
                 sampler: Sampler, eos_id: Optional[int], pad_id: int) -> tuple[jax.Array, Cache]:
  """Feeds each sampled token back through one flash-decoding step: tokens [B, 1 + len(keys)],
  and the cache, returned so the donated input buffers are updated in place."""

  absorbed = absorbed_weights(model.config, params)  # once per call, outside the loop

  def finished(token: jax.Array) -> jax.Array:
    return jnp.zeros(token.shape, bool) if eos_id is None else token == eos_id

  def step(carry, key):
    cache, token, done = carry  # token [B]: the last one sampled; done [B]: EOS already out
    nxt, cache = decode_token(model, params, token, cache, key, sampler, absorbed=absorbed)
    nxt = jnp.where(done, pad_id, nxt)
    return (cache, nxt, done | finished(nxt)), nxt

  (cache, _, _), rest = jax.lax.scan(step, (cache, first, finished(first)), keys)  # rest [N-1,B]
  return jnp.concatenate([first[:, None], rest.T], axis=1), cache


@functools.partial(jax.jit, static_argnames=("model", "sampler", "attn_impl"),
                   donate_argnames=("cache",))
def decode_step(params, token: jax.Array, cache: Cache, key: jax.Array,
                absorbed: Optional[dict] = None, *, model: Transformer, sampler: Sampler,
                attn_impl: str = DECODE_ATTN_IMPL) -> tuple[jax.Array, Cache]:
  """decode_token compiled alone, cache donated: for host-loop streaming, and the step that
  `mla-jax bench decode` times (the same traced function generate's loop runs). Pass absorbed =
  absorbed_weights(model.config, params), made once, as generate's loop does."""
  return decode_token(model, params, token, cache, key, sampler, attn_impl, absorbed)


_STREAM_PROMPT = ("stream takes one prompt, a flat list of token ids such as [5, 9, 2]; for "
                  "several prompts use generate")


def stream(model: Transformer, params=None, prompt: Optional[Sequence[int]] = None, *,
           max_new_tokens: int, temperature: float = 0.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, eos_id: Optional[int] = None,
           seed: int = 0, decode_kernel: Optional[str] = None) -> Iterator[int]:
  """Yields one prompt's new tokens as they are sampled (one host round trip per token: for
  interactive output; `generate` runs the whole loop on the device). Same keys, same tokens.
  Validation and compilation happen in this call; the returned iterator only runs.
  stream(linen_model, params, prompt, ...) or stream(nnx_model, prompt, ...).

  Raises ValueError, before any compute, for: a prompt that is not one flat sequence of token ids
  in [0, vocab_size), an invalid sampling option (check_sampling: NaN or inf temperature or top_p
  included), a seed that is not an integer, or prompt + max_new_tokens past model.max_seq_len.
  decode_kernel: as in generate."""
  model, params, prompt = as_linen(model, params, prompt, "stream")
  model = with_decode_kernel(model, decode_kernel)
  cfg = model.config
  check_sampling(cfg.vocab_size, max_new_tokens, temperature, top_k, top_p, eos_id)
  check_seed(seed)
  (row,) = _prompt_rows([_list_row(0, prompt, _STREAM_PROMPT)], cfg.vocab_size)
  max_len = cache_length(len(row), max_new_tokens, cfg.max_seq_len)
  sampler = Sampler(float(temperature), top_k, None if top_p is None else float(top_p))
  keys = jax.random.split(jax.random.key(seed), max_new_tokens)

  # Compile both programs now (ahead of time), so the caller can time them apart from decoding.
  prompt_ids, lengths = jnp.asarray(row[None]), jnp.asarray([len(row)], jnp.int32)
  prefill = _prefill.lower(params, prompt_ids, lengths, keys[0], model=model, max_len=max_len,
                           sampler=sampler).compile()
  first_token, cache_shape = prefill.out_info
  absorbed = jax.jit(absorbed_weights, static_argnums=0)(cfg, params)
  step = decode_step.lower(params, first_token, cache_shape, keys[0], absorbed, model=model,
                           sampler=sampler).compile()

  def tokens() -> Iterator[int]:
    token, cache = prefill(params, prompt_ids, lengths, keys[0])
    for i in range(max_new_tokens):
      value = int(token[0])
      yield value
      if value == eos_id or i + 1 == max_new_tokens:
        return
      token, cache = step(params, token, cache, keys[i + 1], absorbed)

  return tokens()


def with_decode_kernel(model: Transformer, decode_kernel: Optional[str]) -> Transformer:
  """model, or with decode_kernel ('auto', 'xla' or 'pallas') a copy of it whose
  model.decode_kernel is that (checked by ModelConfig: ValueError naming the field)."""
  if decode_kernel is None:
    return model
  return model.clone(config=dataclasses.replace(model.config, decode_kernel=decode_kernel))


def as_linen(model, params, prompts, function: str):
  """(Linen Transformer, plain parameter tree, prompts) for generate/stream called either as
  f(linen_model, params, prompts) or f(nnx_model, prompts) (or prompts=...): an NNX model holds its
  parameters, which are the Linen model's tree, so it runs through the same compiled programs.
  Raises TypeError for an NNX model given parameters too, or a Linen model given none."""
  nnx = sys.modules.get("flax.nnx")  # loaded wherever an NNX model exists (it imports optax)
  if nnx is not None and isinstance(model, nnx.Module):
    from mla_jax.nnx import Transformer as NNXTransformer, model_params
    if not isinstance(model, NNXTransformer):
      raise TypeError(f"{function} takes an mla_jax.nnx.Transformer or an mla_jax.Transformer, "
                      f"got {type(model).__name__}")
    if params is not None and prompts is not None:
      raise TypeError(f"an NNX model holds its parameters: call {function}(model, prompts, ...)"
                      f" without params")
    return (Transformer(model.config, remat=model.remat), model_params(model),
            params if prompts is None else prompts)
  if params is None or prompts is None:
    raise TypeError(f"{function}(model, params, prompts, ...) needs the prompts and the "
                    "parameters (the Linen Transformer takes its parameters as an argument)")
  return model, unbox(params), prompts


def cache_length(longest_prompt: int, max_new_tokens: int, max_seq_len: int) -> int:
  """Longest prompt + max_new_tokens, refused past the model's max_seq_len before any compute."""
  total = longest_prompt + max_new_tokens
  if total > max_seq_len:
    raise ValueError(f"longest prompt ({longest_prompt} tokens) + max_new_tokens ({max_new_tokens})"
                     f" = {total} exceeds model.max_seq_len ({max_seq_len})")
  return total


def generate(model: Transformer, params=None, prompts=None, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_id: Optional[int] = None, seed: int = 0, pad_id: int = 0,
             return_lengths: bool = False, attention_mask=None, lengths=None,
             speculative: int = 0, return_stats: bool = False,
             decode_kernel: Optional[str] = None):
  """Continues each prompt by max_new_tokens tokens: generate(linen_model, params, prompts, ...)
  or generate(nnx_model, prompts, ...) (an mla_jax.nnx.Transformer holds its parameters).

  prompts: token lists of any lengths, or an int array [B,T] with exactly one of
    attention_mask [B,T]: 1 on real tokens, 0 on padding, which may be on the left (Hugging
      Face's padding_side="left") or on the right; each row's ones must be contiguous;
    lengths [B]: the first lengths[b] tokens of row b are real, the rest is padding (the form
      generate itself returns).
  An array with neither, both, or padding between real tokens raises ValueError: padding
  cannot be told from tokens, so it is refused rather than guessed. So do, before any compute:
  a flat list of ids (one prompt not wrapped in a list), ids outside [0, vocab_size), an invalid
  sampling option (check_sampling), a pad_id outside [0, vocab_size) and a seed that is not an
  integer.

  speculative=k (k >= 1): self-speculative decoding (mla_jax/speculative.py): the model's
  first MTP module (model.num_mtp_layers >= 1) drafts k tokens, the model verifies them in one
  step; greedy gives exactly the tokens it gives without, sampling the same distribution (other
  draws for the same seed). A model without MTP modules, or a k that is not a positive integer,
  raises ValueError.

  Returns int32 [B, L] with L = longest prompt + max_new_tokens: row b is prompt b's real
  tokens, then its new tokens, then pad_id (after an EOS, and for shorter prompts), whatever
  side the input was padded on. With return_lengths, also each row's real length [B]; with
  return_stats (speculative only), last the run's SpeculativeStats (drafts kept per position,
  verify steps).
  decode_kernel: 'auto', 'xla' or 'pallas' overrides model.decode_kernel for this call (MLA's
  decode attention: the Pallas kernel or XLA's flash-decoding loop; same tokens up to float
  rounding).
  """
  model, params, prompts = as_linen(model, params, prompts, "generate")
  model = with_decode_kernel(model, decode_kernel)
  cfg = model.config
  check_sampling(cfg.vocab_size, max_new_tokens, temperature, top_k, top_p, eos_id)
  check_token_id("pad_id", pad_id, cfg.vocab_size)
  check_seed(seed)
  if return_stats and not speculative:
    raise ValueError("return_stats=True needs speculative=k: plain decoding keeps no statistics")
  if speculative:
    from mla_jax.speculative import check_speculative

    check_speculative(cfg, speculative)
  rows = _prompt_rows(prompts, cfg.vocab_size, attention_mask, lengths)
  prompt_lengths = np.array([len(r) for r in rows], np.int32)
  longest = int(prompt_lengths.max())
  max_len = cache_length(longest, max_new_tokens, cfg.max_seq_len)
  padded = np.full((len(rows), longest), pad_id, np.int32)
  for b, row in enumerate(rows):
    padded[b, :len(row)] = row

  sampler = Sampler(float(temperature), top_k, None if top_p is None else float(top_p))
  stats = None
  if speculative:
    from mla_jax.speculative import speculative_decode

    new, stats = speculative_decode(model, params, padded, prompt_lengths, max_len=max_len,
                                    max_new_tokens=max_new_tokens, sampler=sampler,
                                    k=speculative, eos_id=eos_id, pad_id=pad_id, seed=seed)
  else:
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
  results = (out,) + ((prompt_lengths + generated,) if return_lengths else ()) + (
      (stats,) if return_stats else ())
  return results if len(results) > 1 else out
