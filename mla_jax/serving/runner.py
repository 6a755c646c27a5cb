"""The engine's device side: the paged cache's pools and the few compiled programs that run the
model over them. Everything that varies per step (which sequences, their lengths, page tables,
sampling settings) is data, so a whole serving run compiles:

  step     the model over [R,T] tokens through the paged cache, then one sampled token per
           row; compiled once per shape bucket: decode (T = 1, R in decode_buckets: a step runs
           the smallest bucket that holds its sequences, so idle rows cost nothing) and prefill
           (R in prefill row buckets, T in chunk-width buckets: one chunk of a prompt per row,
           after what the row already holds);
           with speculative=k (mla_jax/speculative.py), decode is one speculative round (T =
           k+1: verify the k drafts, catch the MTP module up, draft k more) and prefill also
           runs the chunk through the MTP module, whose pages (one more layer's pool, under the
           same page table) hold its cache, and drafts after a prompt's last chunk;
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

from mla_jax.kinds import absorbed_weights, attention_kind, init_layer_cache, init_paged_cache
from mla_jax.model import Transformer, _hidden, output_logits
from mla_jax.paged_cache import PagedCache, PagedLayerCache, copy_pages, no_page, page_bytes
from mla_jax.speculative import (RowSampling, catch_up_and_draft, masked_row_logits,
                                 speculative_round)

TRACES = {"step": 0, "copy": 0}  # how often each program was traced (tests count compiles)


def sample_rows(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                keys: jax.Array) -> jax.Array:
  """One token per row from logits [R,V] with per-row settings (all [R]): temperature (0 =
  greedy argmax), top_k (0 = off), top_p (1 = off), keys (typed PRNG keys). mla_jax.sampling.
  Sampler's semantics row by row (top-k, then top-p over what top-k kept, then a categorical
  draw), with the settings as data so one program serves every mix of requests. int32 [R]."""
  greedy = jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
  scaled = masked_row_logits(logits, temperature, top_k, top_p)
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


def _spec_prefill(params, absorbed, pools, tokens, lengths, num_tokens, page_table, following,
                  temperature, top_k, top_p, seeds, token_index, *, model: Transformer, k: int):
  """_step's prefill chunk, then the chunk through the MTP module (position i reads the token
  after it: the chunk shifted left, then following[r], the prompt's next token, or the sampled
  one where following is -1) and k drafts after its last real token. pools: the model's layers'
  and, last, the MTP module's. -> (sampled [R], drafts [R,k], their distributions [R,k,V], the
  pools)."""
  TRACES["step"] += 1
  cfg = model.config
  absorbed = absorbed or {}
  layers, mtp_layers = pools[:cfg.num_layers], pools[cfg.num_layers:]
  cache = PagedCache(layers=layers, lengths=lengths, page_table=page_table)
  hidden, cache, _ = _hidden(cfg, params, tokens, cache, "auto", num_tokens, "none", absorbed)
  last = jnp.maximum(num_tokens - 1, 0)
  h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [R,1,D]
  keys = request_keys(seeds, token_index)
  sampled = sample_rows(output_logits(cfg, params, h, decoding=True)[:, 0], temperature, top_k,
                        top_p, keys)
  after = jnp.where(following >= 0, following, sampled)  # [R]
  shifted = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
  mtp_tokens = jnp.where(jnp.arange(tokens.shape[1])[None, :] == last[:, None], after[:, None],
                         shifted)
  mtp_cache = PagedCache(layers=mtp_layers, lengths=lengths, page_table=page_table)
  mtp_cache, drafts, q = catch_up_and_draft(
      cfg, params, absorbed, mtp_cache, hidden, mtp_tokens, num_tokens,
      RowSampling(temperature, top_k, top_p), k, jax.vmap(jax.random.fold_in)(keys, jnp.ones_like(
          token_index)), attn_impl="auto")
  return sampled, drafts, q, cache.layers + mtp_cache.layers


def _spec_decode(params, absorbed, pools, tokens, q, lengths, verified, page_table, temperature,
                 top_k, top_p, seeds, token_index, *, model: Transformer):
  """One speculative round (mla_jax.speculative.speculative_round) per row: tokens [R,k+1]
  (the last token, then the drafts), q [R,k,V] their distributions, verified [R] (0 for an idle
  row); the round's keys are the request's key of token token_index[r], the first it commits.
  -> (kept [R], committed [R,k+1], the next drafts [R,k] and distributions, the pools)."""
  TRACES["step"] += 1
  layers, mtp_layers = pools[:model.config.num_layers], pools[model.config.num_layers:]
  cache = PagedCache(layers=layers, lengths=lengths, page_table=page_table)
  mtp_cache = PagedCache(layers=mtp_layers, lengths=lengths, page_table=page_table)
  cache, mtp_cache, kept, committed, _, drafts, q = speculative_round(
      model.config, params, absorbed or {}, cache, mtp_cache, tokens[:, 0], tokens[:, 1:], q,
      verified, RowSampling(temperature, top_k, top_p), request_keys(seeds, token_index))
  return kept, committed, drafts, q, cache.layers + mtp_cache.layers


def _copy(layers, sources, targets):
  TRACES["copy"] += 1
  cache = PagedCache(layers=layers, lengths=jnp.zeros((1,), jnp.int32),
                     page_table=jnp.zeros((1, 1), jnp.int32))
  return copy_pages(cache, sources, targets).layers


# Each program's per-row arguments after (params, absorbed, pools), and their dtypes.
_ARGUMENTS = {
    "step": (("tokens", np.int32), ("lengths", np.int32), ("num_tokens", np.int32),
             ("page_table", np.int32), ("temperature", np.float32), ("top_k", np.int32),
             ("top_p", np.float32), ("seeds", np.uint32), ("token_index", np.int32)),
    "prefill": (("tokens", np.int32), ("lengths", np.int32), ("num_tokens", np.int32),
                ("page_table", np.int32), ("following", np.int32), ("temperature", np.float32),
                ("top_k", np.int32), ("top_p", np.float32), ("seeds", np.uint32),
                ("token_index", np.int32)),
    "decode": (("tokens", np.int32), ("q", np.float32), ("lengths", np.int32),
               ("verified", np.int32), ("page_table", np.int32), ("temperature", np.float32),
               ("top_k", np.int32), ("top_p", np.float32), ("seeds", np.uint32),
               ("token_index", np.int32)),
}


class ModelRunner:
  """The pools of num_pages pages of page_size slots per layer, and the programs over them.

  step(rows) runs one compiled program for R rows (R = max_seqs for decode, prefill_rows for
  prefill); each row is given by numpy arrays: tokens [R,T], lengths [R], num_tokens [R],
  page_table [R,M], temperature/top_k/top_p [R], seeds [R], token_index [R]. With
  speculative=k, prefill(rows) and decode(rows) run the speculative programs instead (one more
  pool, the MTP module's, last). With a mesh, the parameters are laid out by the library's rules,
  the rows split over its 'data' axis and the pools' pages too (when they divide), and XLA moves
  the pages a row needs.
  """

  def __init__(self, model: Transformer, params: Any, *, num_pages: int, page_size: int,
               pages_per_sequence: int, cache_dtype: Optional[str] = None,
               mesh: Optional[Mesh] = None, speculative: int = 0):
    self.model, self.config, self.mesh = model, model.config, mesh
    self.speculative = speculative
    cache = init_paged_cache(self.config, num_pages, page_size, 1, pages_per_sequence,
                             cache_dtype)
    if speculative:
      mtp_pool = PagedLayerCache(pool=init_layer_cache(self.config, num_pages, page_size,
                                                       cache_dtype))
      cache = cache.replace(layers=cache.layers + (mtp_pool,))
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
    self._programs = {
        "step": jax.jit(functools.partial(_step, model=model), donate_argnums=(2,)),
        "prefill": jax.jit(functools.partial(_spec_prefill, model=model, k=speculative),
                           donate_argnums=(2,)),
        "decode": jax.jit(functools.partial(_spec_decode, model=model), donate_argnums=(2,))}
    self._copy = jax.jit(_copy, donate_argnums=(0,))

  def _kind(self, kind: str) -> str:
    """The program a decode or prefill runs: 'step' for both without speculation."""
    return kind if self.speculative else "step"

  def compile(self, decode_shapes: list[tuple[int, int]], prefill_shapes: list[tuple[int, int]],
              copy_width: int) -> float:
    """Compiles the decode and prefill programs for each (rows, width) given (without
    speculation one program serves both, compiled once per shape) and the page copy
    (copy_width pairs) ahead of time; returns the seconds it took."""
    start = time.perf_counter()
    self._compiled = {}
    for kind, shapes in (("decode", decode_shapes), ("prefill", prefill_shapes)):
      for rows, width in shapes:
        key = (self._kind(kind), rows, width)
        if key not in self._compiled:
          args = self._placed(key[0], self._empty_rows(key[0], rows, width))
          self._compiled[key] = self._programs[key[0]].lower(
              self.params, self.absorbed, self.layers, *args).compile()
    pairs = self._rows(np.zeros((copy_width,), np.int32))
    self._compiled_copy = self._copy.lower(self.layers, pairs, pairs).compile()
    self.copy_width = copy_width
    return time.perf_counter() - start

  @property
  def num_programs(self) -> int:
    """Programs compiled: the step programs and the page copy."""
    return len(self._compiled) + 1

  def _empty_rows(self, kind: str, rows: int, width: int) -> list[np.ndarray]:
    shapes = {"tokens": (rows, width), "page_table": (rows, self.pages_per_sequence),
              "q": (rows, self.speculative, self.config.vocab_size)}
    return [np.ones(shapes.get(name, (rows,))) if name == "top_p" else
            np.zeros(shapes.get(name, (rows,))) for name, _ in _ARGUMENTS[kind]]

  def _placed(self, kind: str, arrays: list[np.ndarray]) -> list[jax.Array]:
    """A program's per-row arguments in their dtypes, on the device."""
    return [self._rows(np.asarray(x, dtype)) for x, (_, dtype) in zip(arrays, _ARGUMENTS[kind])]

  def _rows(self, x: np.ndarray) -> jax.Array:
    """A per-row host array on the device (split over the mesh's data axis when it divides)."""
    if self.mesh is None:
      return jnp.asarray(x)
    data = self.mesh.shape.get("data", 1)
    spec = P("data") if data > 1 and x.shape[0] % data == 0 else P()
    return jax.device_put(x, NamedSharding(self.mesh, spec))

  def _run(self, kind: str, rows: dict[str, np.ndarray]) -> tuple:
    program = self._compiled[(self._kind(kind), *rows["tokens"].shape)]
    args = self._placed(self._kind(kind), [rows[name] for name, _ in _ARGUMENTS[self._kind(kind)]])
    *outputs, self.layers = program(self.params, self.absorbed, self.layers, *args)
    return tuple(np.asarray(x) for x in outputs)

  def step(self, **rows: np.ndarray) -> np.ndarray:
    """Runs the rows (step's arguments, by name) through the compiled program of their shape
    and returns each row's sampled token (numpy int32 [R])."""
    return self._run("step", rows)[0]

  def prefill(self, **rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """With speculation: one prefill chunk per row (step's arguments and following [R], the
    prompt's token after the chunk or -1 after its last) -> (sampled [R], drafts [R,k], their
    distributions [R,k,V])."""
    return self._run("prefill", rows)

  def decode(self, **rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """With speculation: one round per row (tokens [R,k+1]: the last token and its drafts, q
    [R,k,V], lengths, verified, page_table, sampling, seeds, token_index) -> (kept [R],
    committed [R,k+1], next drafts [R,k], their distributions [R,k,V])."""
    return self._run("decode", rows)

  def copy(self, pairs: list[tuple[int, int]]) -> None:
    """Copies page a to page b in every layer for each (a, b), copy_width pairs per call."""
    width = self.copy_width
    for start in range(0, len(pairs), width):
      sources = np.zeros((width,), np.int32)
      targets = np.full((width,), no_page(self.num_pages), np.int32)
      for i, (a, b) in enumerate(pairs[start:start + width]):
        sources[i], targets[i] = a, b
      self.layers = self._compiled_copy(self.layers, self._rows(sources), self._rows(targets))
