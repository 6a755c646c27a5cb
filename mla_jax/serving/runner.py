"""The engine's device side: the paged cache's pools and the few compiled programs that run the
model over them. Everything that varies per step (which sequences, their lengths, page tables,
sampling settings) is data, so a whole serving run compiles:

  step     the model over [R,T] tokens through the paged cache, then one sampled token per
           row; compiled once per shape bucket: decode (T = 1, R in decode_buckets: a step runs
           the smallest bucket that holds its sequences, so idle rows cost nothing) and prefill
           (R in prefill row buckets, T in chunk-width buckets: one chunk of a prompt per row,
           after what the row already holds);
  copy     page copies (copy-on-write of shared prefix pages), copy_width pairs at a time;
  absorb   the absorbed MLA weights, once.

The pools are donated to every program, so their buffers are updated in place.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mla_jax.kinds import absorbed_weights, attention_kind, init_paged_cache
from mla_jax.model import Transformer
from mla_jax.paged_cache import PagedCache, copy_pages, no_page, page_bytes

TRACES = {"step": 0, "copy": 0}  # how often each program was traced (tests count compiles)


def sample_rows(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                keys: jax.Array) -> jax.Array:
  """One token per row from logits [R,V] with per-row settings (all [R]): temperature (0 =
  greedy argmax), top_k (0 = off), top_p (1 = off), keys (typed PRNG keys). mla_jax.sampling.
  Sampler's semantics row by row (top-k, then top-p over what top-k kept, then a categorical
  draw), with the settings as data so one program serves every mix of requests. int32 [R]."""
  logits = logits.astype(jnp.float32)
  v = logits.shape[-1]
  lowest = jnp.finfo(jnp.float32).min
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  ordered = -jnp.sort(-scaled, axis=-1)  # [R,V] most likely first
  k = jnp.where(top_k > 0, top_k, v)
  rank = jnp.arange(v)[None, :]
  ordered = jnp.where(rank < k[:, None], ordered, lowest)  # top-k kept
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
  kept = (rank < k[:, None]) & (before < top_p[:, None])  # top-1 always kept
  threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1)  # the least kept logit
  scaled = jnp.where(scaled >= threshold[:, None], scaled, lowest)
  drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scaled)
  return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)


def request_keys(seeds: jax.Array, token_index: jax.Array) -> jax.Array:
  """The PRNG key of token token_index[r] of the request seeded seeds[r]: fold_in(key(seed), i),
  independent of which row or batch the request runs in."""
  return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, token_index)


def _step(params, absorbed, layers, tokens, lengths, num_tokens, page_table, temperature, top_k,
          top_p, seeds, token_index, *, model: Transformer):
  """tokens [R,T] after lengths[r] cached tokens, num_tokens[r] of them real -> (the token
  sampled after each row's last real one [R], the updated pools)."""
  TRACES["step"] += 1
  cache = PagedCache(layers=layers, lengths=lengths, page_table=page_table)
  variables = {"params": params} if absorbed is None else {"params": params, "absorbed": absorbed}
  logits, cache = model.apply(variables, tokens, cache=cache, num_tokens=num_tokens)  # [R,T,V]
  last = jnp.maximum(num_tokens - 1, 0)
  logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]  # [R,V]
  keys = request_keys(seeds, token_index)
  return sample_rows(logits, temperature, top_k, top_p, keys), cache.layers


def _copy(layers, sources, targets):
  TRACES["copy"] += 1
  cache = PagedCache(layers=layers, lengths=jnp.zeros((1,), jnp.int32),
                     page_table=jnp.zeros((1, 1), jnp.int32))
  return copy_pages(cache, sources, targets).layers


class ModelRunner:
  """The pools of num_pages pages of page_size slots per layer, and the programs over them.

  step(rows) runs one compiled program for R rows (R = max_seqs for decode, prefill_rows for
  prefill); each row is given by numpy arrays: tokens [R,T], lengths [R], num_tokens [R],
  page_table [R,M], temperature/top_k/top_p [R], seeds [R], token_index [R]. With a mesh, the
  parameters are laid out by the library's rules, the rows split over its 'data' axis and the
  pools' pages too (when they divide), and XLA moves the pages a row needs.
  """

  def __init__(self, model: Transformer, params: Any, *, num_pages: int, page_size: int,
               pages_per_sequence: int, cache_dtype: Optional[str] = None,
               mesh: Optional[Mesh] = None):
    self.model, self.config, self.mesh = model, model.config, mesh
    cache = init_paged_cache(self.config, num_pages, page_size, 1, pages_per_sequence,
                             cache_dtype)
    self.page_bytes = page_bytes(cache)
    self.num_pages, self.page_size = num_pages, page_size
    self.pages_per_sequence = pages_per_sequence
    layers = cache.layers
    if mesh is not None:
      from mla_jax.sharding import shard

      params = shard(params, mesh)
      data = mesh.shape.get("data", 1)
      pages = P("data") if data > 1 and num_pages % data == 0 else P()
      layers = jax.device_put(layers, NamedSharding(mesh, pages))
    self.params, self.layers = params, layers
    self.absorbed = None
    if attention_kind(self.config).absorbs:
      self.absorbed = jax.jit(absorbed_weights, static_argnums=0)(self.config, params)
    self._step = jax.jit(functools.partial(_step, model=model), donate_argnums=(2,))
    self._copy = jax.jit(_copy, donate_argnums=(0,))

  def compile(self, shapes: list[tuple[int, int]], copy_width: int) -> float:
    """Compiles the step program for each (rows, width) in `shapes` and the page copy
    (copy_width pairs) ahead of time; returns the seconds it took."""
    start = time.perf_counter()
    self._compiled = {}
    for rows, width in shapes:
      args = self._placed(self._empty_rows(rows, width))
      self._compiled[(rows, width)] = self._step.lower(
          self.params, self.absorbed, self.layers, *args).compile()
    pairs = self._rows(np.zeros((copy_width,), np.int32))
    self._compiled_copy = self._copy.lower(self.layers, pairs, pairs).compile()
    self.copy_width = copy_width
    return time.perf_counter() - start

  def _empty_rows(self, rows: int, width: int) -> list[np.ndarray]:
    return [np.zeros((rows, width)), np.zeros((rows,)), np.zeros((rows,)),
            np.zeros((rows, self.pages_per_sequence)), np.zeros((rows,)), np.zeros((rows,)),
            np.ones((rows,)), np.zeros((rows,)), np.zeros((rows,))]

  def _placed(self, arrays: list[np.ndarray]) -> list[jax.Array]:
    """step's per-row arguments in their dtypes, on the device."""
    dtypes = (np.int32, np.int32, np.int32, np.int32, np.float32, np.int32, np.float32,
              np.uint32, np.int32)
    return [self._rows(np.asarray(x, dtype)) for x, dtype in zip(arrays, dtypes)]

  def _rows(self, x: np.ndarray) -> jax.Array:
    """A per-row host array on the device (split over the mesh's data axis when it divides)."""
    if self.mesh is None:
      return jnp.asarray(x)
    data = self.mesh.shape.get("data", 1)
    spec = P("data") if data > 1 and x.shape[0] % data == 0 else P()
    return jax.device_put(x, NamedSharding(self.mesh, spec))

  def step(self, tokens: np.ndarray, lengths: np.ndarray, num_tokens: np.ndarray,
           page_table: np.ndarray, temperature: np.ndarray, top_k: np.ndarray,
           top_p: np.ndarray, seeds: np.ndarray, token_index: np.ndarray) -> np.ndarray:
    """Runs the rows through the compiled program of their shape and returns each row's
    sampled token (numpy int32 [R])."""
    program = self._compiled[tokens.shape]
    args = self._placed([tokens, lengths, num_tokens, page_table, temperature, top_k, top_p,
                         seeds, token_index])
    sampled, self.layers = program(self.params, self.absorbed, self.layers, *args)
    return np.asarray(sampled)

  def copy(self, pairs: list[tuple[int, int]]) -> None:
    """Copies page a to page b in every layer for each (a, b), copy_width pairs per call."""
    width = self.copy_width
    for start in range(0, len(pairs), width):
      sources = np.zeros((width,), np.int32)
      targets = np.full((width,), no_page(self.num_pages), np.int32)
      for i, (a, b) in enumerate(pairs[start:start + width]):
        sources[i], targets[i] = a, b
      self.layers = self._compiled_copy(self.layers, self._rows(sources), self._rows(targets))
