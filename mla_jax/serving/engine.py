"""The serving engine: continuous batching over a paged latent cache, with prefix sharing.

Requests arrive at any time (add_request, thread-safe) and wait in arrival order. Each step:

  1. decode: every running sequence whose prompt is in the cache gets one token, all in one
     program over max_seqs rows (idle rows do nothing);
  2. prefill: waiting requests are admitted while a row is free, and up to prefill_rows of the
     sequences still being prefilled each run one chunk of at most prefill_chunk prompt tokens
     (chunked prefill: a long prompt never stalls the running ones for more than a chunk).

A sequence holds ceil(tokens / page_size) pages, allocated as it grows and released the moment
it finishes, is cancelled or fails. With prefix sharing, a new prompt first takes the cached
full pages of its longest cached prefix (reference-counted; a page is copied before a sequence
writes into a shared one). When a sequence needs a page and none is free, the newest running
sequence is preempted: its pages are released and it waits again at the front of the queue, to
be recomputed from its prompt and the tokens it already produced (they are kept, and token i is
always drawn with the request's i-th key, so a preempted request ends as it would have).

Shapes come from fixed buckets (decode: powers of two up to max_seqs rows; prefill: powers of two
up to prefill_rows rows times up to prefill_chunk tokens; one page table width), so a serving run
compiles a handful of programs, whatever its requests, and a step computes the smallest bucket
that holds its work: a quiet engine does not pay for max_seqs rows.

Admission: a waiting request joins while a row is free and the free pages cover its prompt beyond
what the prompts already admitted still need, so a burst of requests is not admitted only to be
preempted at once; the queue is served in arrival order (the first waiting request that does not
fit stops admission until pages free up).

Speculative decoding (speculative=k, a model with an MTP module; mla_jax/speculative.py): each
decode step is one round per sequence, verifying the k tokens its MTP module drafted and
committing the kept ones plus one, 1 to k + 1 tokens a step; the module's cache is one more
pool under the same page table. A sequence reserves pages for the positions the round writes
(its drafts' too, up to its own end). With prefix sharing, a prompt resumes one token before the
end of its shared pages: the module's entry at a position depends on the token after it, which
the sharing prompt may not have.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import sys
import threading
import time
from typing import Any, Iterator, Optional, Sequence, Union

import jax
import numpy as np

from mla_jax.device_memory import device_memory_available, gib
from mla_jax.model import Transformer
from mla_jax.kinds import init_paged_cache
from mla_jax.paged_cache import no_page, page_bytes
from mla_jax.sampling import _is_integer, as_linen, with_decode_kernel
from mla_jax.serving.pages import OutOfPages, PagePool
from mla_jax.serving.requests import Completion, InvalidRequest, RequestOutput, SamplingParams
from mla_jax.serving.runner import ModelRunner
from mla_jax.speculative import check_speculative

# Defaults, measured with `mla-jax bench serve --page-sizes` (docs/serving.md).
DEFAULT_PAGE_SIZE = 16
DEFAULT_MAX_SEQS = 16
DEFAULT_PREFILL_CHUNK = 64
DEFAULT_PREFILL_ROWS = 2
SMALLEST_DECODE_BUCKET = 8  # fewer rows than this cost about the same: the weights' read binds
SMALLEST_PREFILL_WIDTH = 16


def shape_buckets(largest: int, smallest: int) -> tuple[int, ...]:
  """Powers of two from `smallest` up to below `largest`, then `largest`: the row counts (or
  chunk widths) compiled, so padding to the next bucket costs at most 2x the work it pads."""
  sizes, size = [], min(smallest, largest)
  while size < largest:
    sizes.append(size)
    size *= 2
  return tuple(sizes) + (largest,)


@dataclasses.dataclass
class _Sequence:
  """One request while the engine holds it."""

  request_id: str
  prompt: list[int]
  sampling: SamplingParams
  arrival_s: float
  order: int  # arrival number: the queue's order, and "newest" for preemption
  generated: list[int] = dataclasses.field(default_factory=list)
  pages: list[int] = dataclasses.field(default_factory=list)
  cached: int = 0  # tokens whose entries are in the cache
  first_token_s: Optional[float] = None
  preemptions: int = 0
  drafts: Optional[np.ndarray] = None  # speculative: the MTP module's k drafts [k] ...
  draft_probs: Optional[np.ndarray] = None  # ... and the distributions they came from [k,V]

  @property
  def tokens(self) -> list[int]:
    return self.prompt + self.generated

  @property
  def prefilled(self) -> bool:
    """Every token but the last sampled one is in the cache: the sequence decodes."""
    return bool(self.generated) and self.cached == len(self.tokens) - 1


def _positive_int(name: str, value) -> int:
  if not _is_integer(value) or value < 1:
    raise ValueError(f"{name}={value!r} is invalid: must be a positive integer")
  return int(value)


class Engine:
  """Continuous batching over a paged cache (see the module docstring).

  Engine(linen_model, params, ...) or Engine(nnx_model, ...). max_seqs: sequences running at
  once (decode rows); page_size: token slots per page; num_pages or cache_budget_bytes (the pool
  gets cache_budget_bytes // bytes_per_page pages; default: room for max_seqs sequences of
  max_seq_len tokens); prefill_chunk / prefill_rows: prompt tokens per prefill row (default
  DEFAULT_PREFILL_CHUNK, or max_seq_len if shorter) and rows per step; cache_dtype: the pools' dtype (model.cache_dtype or model.dtype by default; int8/int4
  for MLA); prefix_sharing: reuse cached full pages of identical prompt prefixes; tokenizer
  (encode/decode) for text prompts and Completion.text; mesh: parameters laid out by the
  library's rules, rows and pages split over its 'data' axis; speculative=k: the model's MTP
  module drafts k tokens per sequence and decode step (the module docstring). decode_kernel:
  overrides model.decode_kernel ('auto', 'xla' or 'pallas').

  Raises ValueError, before anything is compiled or allocated, for sizes that are not positive
  integers, a page_size above model.max_seq_len, both or a too small num_pages /
  cache_budget_bytes, a pool larger than a device's memory, and speculative on a model without
  an MTP module; TypeError for a model it cannot run.
  """

  def __init__(self, model, params=None, *, max_seqs: int = DEFAULT_MAX_SEQS,
               page_size: int = DEFAULT_PAGE_SIZE, num_pages: Optional[int] = None,
               cache_budget_bytes: Optional[int] = None,
               prefill_chunk: Optional[int] = None,
               prefill_rows: int = DEFAULT_PREFILL_ROWS, cache_dtype: Optional[str] = None,
               prefix_sharing: bool = True, tokenizer=None, mesh=None, speculative: int = 0,
               decode_kernel: Optional[str] = None):
    model, params = _linen_model(model, params)
    model = with_decode_kernel(model, decode_kernel)
    self.model, self.config, self.tokenizer = model, model.config, tokenizer
    if speculative:
      check_speculative(self.config, speculative)
    self.speculative = int(speculative)
    self.max_seqs = _positive_int("max_seqs", max_seqs)
    self.page_size = _positive_int("page_size", page_size)
    if prefill_chunk is None:  # no longer than the longest sequence
      prefill_chunk = min(DEFAULT_PREFILL_CHUNK, self.config.max_seq_len)
    self.prefill_chunk = _positive_int("prefill_chunk", prefill_chunk)
    if self.prefill_chunk > self.config.max_seq_len:
      raise ValueError(f"prefill_chunk={prefill_chunk} is invalid: must be at most "
                       f"model.max_seq_len ({self.config.max_seq_len})")
    self.prefill_rows = _positive_int("prefill_rows", prefill_rows)
    if self.page_size > self.config.max_seq_len:
      raise ValueError(f"page_size={page_size} is invalid: must be at most model.max_seq_len "
                       f"({self.config.max_seq_len}), the longest sequence a page can hold")
    self.pages_per_sequence = -(-self.config.max_seq_len // self.page_size)
    self.bytes_per_page = bytes_per_page(self.config, self.page_size, cache_dtype,
                                         bool(self.speculative))
    self.bytes_per_token = self.bytes_per_page // self.page_size
    self.num_pages = self._pool_size(num_pages, cache_budget_bytes)
    self._check_pool_fits(num_pages, cache_budget_bytes, mesh)
    self.pool = PagePool(self.num_pages, self.page_size, prefix_sharing=bool(prefix_sharing))
    self.runner = ModelRunner(model, params, num_pages=self.num_pages, page_size=self.page_size,
                              pages_per_sequence=self.pages_per_sequence,
                              cache_dtype=cache_dtype, mesh=mesh, speculative=self.speculative)
    self.decode_buckets = shape_buckets(self.max_seqs, SMALLEST_DECODE_BUCKET)
    self.prefill_row_buckets = shape_buckets(self.prefill_rows, 1)
    self.prefill_width_buckets = shape_buckets(self.prefill_chunk, SMALLEST_PREFILL_WIDTH)
    # Every step program and the page copy, compiled now: serving never waits for a compile.
    self.compile_s = self.runner.compile(
        [(rows, self.speculative + 1) for rows in self.decode_buckets],
        [(rows, width) for rows in self.prefill_row_buckets
         for width in self.prefill_width_buckets], copy_width=self.prefill_rows)
    self.num_programs = self.runner.num_programs
    self._lock = threading.Lock()
    self._inbox: collections.deque = collections.deque()  # ("add", seq) / ("cancel", id)
    self._ids: set[str] = set()  # every id ever added
    self._counter = itertools.count()
    self._waiting: list[_Sequence] = []  # arrival order
    self._running: list[_Sequence] = []  # admission order
    self._stats = collections.Counter()
    self._peak_running = 0
    # Outputs of requests a generate() / stream() collects, by request id; and outputs that
    # their steps produced for other requests, which the next step() returns.
    self._mailboxes: dict[str, collections.deque[RequestOutput]] = {}
    self._held: list[RequestOutput] = []

  def _pool_size(self, num_pages, budget) -> int:
    if num_pages is not None and budget is not None:
      raise ValueError("give num_pages or cache_budget_bytes, not both")
    if budget is not None:
      budget = _positive_int("cache_budget_bytes", budget)
      num_pages = budget // self.bytes_per_page
      if num_pages < 1:
        raise ValueError(f"cache_budget_bytes={budget} holds no page: one page of "
                         f"{self.page_size} tokens takes {self.bytes_per_page} bytes")
      return num_pages
    if num_pages is None:
      return self.max_seqs * self.pages_per_sequence
    return _positive_int("num_pages", num_pages)

  def _check_pool_fits(self, num_pages, budget, mesh) -> None:
    """Refuses a page pool larger than a device's memory before anything is allocated."""
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    data = mesh.shape.get("data", 1) if mesh is not None else 1
    shards = data if self.num_pages % data == 0 else 1  # as the runner lays the pools out
    per_device = self.num_pages * self.bytes_per_page // shards
    available = device_memory_available(devices)
    if available is None or per_device <= available[0]:
      return
    limit, what = available
    given = (f"cache_budget_bytes={budget}" if budget is not None else
             f"num_pages={num_pages}" if num_pages is not None else
             f"max_seqs={self.max_seqs} (num_pages defaults to max_seqs x "
             f"{self.pages_per_sequence} pages)")
    raise ValueError(
        f"{given} is invalid: its pool of {self.num_pages:,} pages needs {gib(per_device)} per "
        f"device, more than the {gib(limit)} available ({what}); at most "
        f"{limit // self.bytes_per_page * shards:,} pages of {self.bytes_per_page:,} bytes fit")

  # ---- requests --------------------------------------------------------------------------

  def add_request(self, prompt: Union[str, Sequence[int]],
                  sampling: SamplingParams = SamplingParams(),
                  request_id: Optional[str] = None) -> str:
    """Queues a request and returns its id (thread-safe). prompt: text (with a tokenizer) or
    token ids. Raises InvalidRequest (a ValueError naming the field in .param), before
    queueing, for an empty prompt, ids outside
    [0, vocab_size), prompt + max_tokens past model.max_seq_len or past what the page pool
    holds, invalid sampling (SamplingParams.check), text without a tokenizer, or an id in use;
    TypeError for sampling that is not a SamplingParams."""
    tokens = self.validate_request(prompt, sampling)
    with self._lock:
      order = next(self._counter)
      if request_id is None:
        request_id = f"req-{order}"
      elif not isinstance(request_id, str) or not request_id:
        raise ValueError(f"request_id={request_id!r} is invalid: must be a non-empty string")
      if request_id in self._ids:
        raise ValueError(f"request_id={request_id!r} is already in use")
      self._ids.add(request_id)
      self._inbox.append(("add", _Sequence(request_id, tokens, sampling, time.perf_counter(),
                                           order)))
    return request_id

  def validate_request(self, prompt, sampling: SamplingParams) -> list[int]:
    """The prompt's token ids, after add_request's checks (raising what add_request raises),
    without queueing anything."""
    cfg = self.config
    if not isinstance(sampling, SamplingParams):
      raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    sampling.check(cfg.vocab_size)
    tokens = self._prompt_tokens(prompt)
    total = len(tokens) + sampling.max_tokens
    at_fault = "prompt" if len(tokens) >= cfg.max_seq_len else "max_tokens"
    if total > cfg.max_seq_len:
      raise InvalidRequest(f"prompt ({len(tokens)} tokens) + max_tokens ({sampling.max_tokens})"
                           f" = {total} exceeds model.max_seq_len ({cfg.max_seq_len})", at_fault)
    if self.pool.pages_for(total) > self.num_pages:
      raise InvalidRequest(f"prompt + max_tokens = {total} tokens needs "
                           f"{self.pool.pages_for(total)} pages of {self.page_size}, more than "
                           f"the pool's num_pages={self.num_pages}: give the engine more pages",
                           at_fault)
    return tokens

  def _prompt_tokens(self, prompt) -> list[int]:
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise InvalidRequest("prompt is text but the engine has no tokenizer: pass token ids "
                             "or Engine(..., tokenizer=...)", "prompt")
      tokens = list(self.tokenizer.encode(prompt))
    elif isinstance(prompt, (bytes, dict)) or not isinstance(prompt, (Sequence, np.ndarray)):
      raise InvalidRequest(f"prompt must be text or a sequence of token ids, got "
                           f"{type(prompt).__name__}", "prompt")
    else:
      tokens = list(prompt)
    if not tokens:
      raise InvalidRequest("prompt is empty: every request needs at least one token", "prompt")
    for i, token in enumerate(tokens):
      if not _is_integer(token) or not 0 <= token < self.config.vocab_size:
        raise InvalidRequest(f"prompt token {i} is {token!r}: must be an integer id in [0, "
                             f"vocab_size={self.config.vocab_size})", "prompt")
    return [int(t) for t in tokens]

  def cancel(self, request_id: str) -> None:
    """Cancels a request (thread-safe): it ends with finish_reason 'cancelled' at the next step
    and its pages are released; a request that already finished is left as it is. Raises
    KeyError for an id never added."""
    with self._lock:
      if request_id not in self._ids:
        raise KeyError(f"no request {request_id!r}")
      self._inbox.append(("cancel", request_id))

  def has_unfinished(self) -> bool:
    with self._lock:
      return bool(self._inbox or self._waiting or self._running)

  @property
  def stats(self) -> dict[str, int]:
    """running, waiting, pages_free, pages_total, peak_running (most sequences held at once),
    preemptions, steps, prefill_tokens and decode_tokens (computed by the model), and
    decode_runs / prefill_runs (step programs run) so far; with speculation also drafts_verified
    and drafts_kept (drafts of the rounds run, and the ones kept)."""
    return {"running": len(self._running), "waiting": len(self._waiting),
            "pages_free": self.pool.num_free, "pages_total": self.num_pages,
            "peak_running": self._peak_running, "preemptions": self._stats["preemptions"],
            "steps": self._stats["steps"], "prefill_tokens": self._stats["prefill_tokens"],
            "decode_tokens": self._stats["decode_tokens"],
            "decode_runs": self._stats["decode_runs"],
            "prefill_runs": self._stats["prefill_runs"],
            **({"drafts_verified": self._stats["drafts_verified"],
                "drafts_kept": self._stats["drafts_kept"]} if self.speculative else {})}

  def reset_prefix_cache(self) -> None:
    """Forgets the cached prompt prefixes (PagePool.reset_prefix_cache); the running requests
    keep their pages."""
    self.pool.reset_prefix_cache()

  # ---- one step --------------------------------------------------------------------------

  def step(self) -> list[RequestOutput]:
    """One engine step: decode one token for every prefilled sequence, then admit and prefill.
    Returns a RequestOutput for every request that produced tokens or finished, less those a
    generate() or stream() in progress collects, plus any that such a call's own steps produced
    for other requests since the last step() (nothing is lost)."""
    delivered, self._held = self._held, []
    return delivered + self._route(self._step())

  def _route(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
    """Puts the outputs of requests a generate() or stream() collects in their mailboxes and
    returns the others."""
    others = []
    for out in outputs:
      if out.request_id in self._mailboxes:
        self._mailboxes[out.request_id].append(out)
      else:
        others.append(out)
    return others

  def _pump(self) -> None:
    """One step on behalf of generate() / stream(): other requests' outputs wait for step()."""
    if not self.has_unfinished():
      raise RuntimeError("the engine has no request left to run, but a generate() or stream() "
                         "still waits for one: was the engine stepped from another thread?")
    self._held += self._route(self._step())

  def _step(self) -> list[RequestOutput]:
    outputs: dict[str, RequestOutput] = {}
    self._take_inbox(outputs)
    self._stats["steps"] += 1
    self._decode(outputs)
    self._prefill(outputs)
    self._peak_running = max(self._peak_running, len(self._running))
    return list(outputs.values())

  def _take_inbox(self, outputs) -> None:
    with self._lock:
      items = list(self._inbox)
      self._inbox.clear()
    for kind, item in items:
      if kind == "add":
        self._waiting.append(item)
        continue
      seq = next((s for s in self._waiting + self._running if s.request_id == item), None)
      if seq is not None:
        self._finish(seq, "cancelled", outputs)

  def _output(self, outputs, seq: _Sequence) -> RequestOutput:
    if seq.request_id not in outputs:
      outputs[seq.request_id] = RequestOutput(seq.request_id, [], False)
    return outputs[seq.request_id]

  def _finish(self, seq: _Sequence, reason: str, outputs, error: Optional[str] = None) -> None:
    """Ends a sequence: pages released, row freed, its Completion in outputs."""
    self._release(seq)
    if seq in self._waiting:
      self._waiting.remove(seq)
    tokens = list(seq.generated)
    text = None
    if self.tokenizer is not None:
      stopped = reason == "stop" and tokens and tokens[-1] in seq.sampling.stop_token_ids
      text = self.tokenizer.decode(tokens[:-1] if stopped else tokens)
    out = self._output(outputs, seq)
    out.finished = True
    out.completion = Completion(seq.request_id, list(seq.prompt), tokens, reason, text,
                                seq.arrival_s, seq.first_token_s, time.perf_counter(),
                                seq.preemptions, error)

  def _release(self, seq: _Sequence) -> None:
    if seq.pages:
      self.pool.release(seq.pages)
    seq.pages, seq.cached = [], 0
    if seq in self._running:
      self._running.remove(seq)

  def _preempt(self, seq: _Sequence) -> None:
    """Releases a running sequence's pages; it waits again, first in line by arrival."""
    self._release(seq)
    seq.preemptions += 1
    self._stats["preemptions"] += 1
    self._waiting.append(seq)
    self._waiting.sort(key=lambda s: s.order)

  def _reserve(self, seq: _Sequence, end: int) -> tuple[bool, list[tuple[int, int]]]:
    """Makes seq's pages cover positions < end and the pages it will write (from seq.cached)
    its own, preempting the newest running sequences while pages run out. Returns (whether seq
    still runs, the (source, target) page copies to make first)."""
    copies: list[tuple[int, int]] = []
    while True:
      try:
        need = self.pool.pages_for(end) - len(seq.pages)
        if need > 0:
          seq.pages += self.pool.allocate(need)
        for index in range(seq.cached // self.page_size, self.pool.pages_for(end)):
          pair = self.pool.copy_on_write(seq.pages, index)
          if pair is not None:
            copies.append(pair)
        return True, copies
      except OutOfPages:
        victim = max(self._running, key=lambda s: s.order)
        self._preempt(victim)
        if victim is seq:
          return False, []

  def _decode(self, outputs) -> None:
    ready = sorted((s for s in self._running if s.prefilled), key=lambda s: s.order)
    copies: list[tuple[int, int]] = []
    for seq in ready:
      if seq in self._running:  # not preempted by an older one's page
        copies += self._reserve(seq, self._decode_end(seq))[1]
    ready = [s for s in ready if s in self._running]
    if not ready:
      return
    self.runner.copy(copies)
    if self.speculative:
      self._decode_speculative(ready, outputs)
      return
    rows = self._row_arrays(_bucket(self.decode_buckets, len(ready)), 1)
    for r, seq in enumerate(ready):
      self._fill_row(rows, r, seq, [seq.tokens[-1]])
    sampled = self._run(rows, ready, outputs)
    if sampled is None:
      return
    self._stats["decode_tokens"] += len(ready)
    self._stats["decode_runs"] += 1
    for r, seq in enumerate(ready):
      seq.cached += 1
      self._register(seq, seq.cached - 1)
      self._accept(seq, int(sampled[r]), outputs)

  def _decode_end(self, seq: _Sequence) -> int:
    """Positions a decode step writes for seq: the next token's; with speculation the round's
    verified inputs and the MTP module's drafts after them, up to the request's own end."""
    if not self.speculative:
      return seq.cached + 1
    return min(seq.cached + 2 * self.speculative, len(seq.prompt) + seq.sampling.max_tokens)

  def _decode_speculative(self, ready: list[_Sequence], outputs) -> None:
    """One speculative round for every ready sequence: each commits 1 to k + 1 tokens."""
    k = self.speculative
    rows = self._row_arrays(_bucket(self.decode_buckets, len(ready)), k + 1)
    rows["q"] = np.zeros((len(rows["lengths"]), k, self.config.vocab_size), np.float32)
    rows["verified"] = np.zeros_like(rows["lengths"])
    for r, seq in enumerate(ready):
      self._fill_row(rows, r, seq, [seq.tokens[-1]] + list(seq.drafts))
      rows["q"][r] = seq.draft_probs
      rows["verified"][r] = min(k + 1, seq.sampling.max_tokens - len(seq.generated))
    del rows["num_tokens"]
    result = self._run(rows, ready, outputs, self.runner.decode)
    if result is None:
      return
    kept, committed, drafts, probs = result
    self._stats["decode_runs"] += 1
    for r, seq in enumerate(ready):
      count = int(kept[r]) + 1
      self._stats["decode_tokens"] += int(rows["verified"][r])
      self._stats["drafts_verified"] += int(rows["verified"][r]) - 1
      self._stats["drafts_kept"] += count - 1
      before, seq.cached = seq.cached, seq.cached + count
      seq.drafts, seq.draft_probs = drafts[r], probs[r]
      if seq.cached // self.page_size > before // self.page_size:  # pages that became full
        self.pool.register(seq.pages, seq.tokens + committed[r, :count - 1].tolist())
      for token in committed[r, :count]:
        self._accept(seq, int(token), outputs)
        if seq not in self._running:  # finished: a stop token or max_tokens
          break

  def _admit(self) -> None:
    """Moves waiting requests to running, in arrival order, while a row is free and the free
    pages cover the next one's uncached tokens beyond what admitted prompts still need."""
    owed = sum(self.pool.pages_for(len(s.tokens)) - len(s.pages)
               for s in self._running if not s.prefilled)
    while self._waiting and len(self._running) < self.max_seqs:
      seq = self._waiting[0]
      if self._running and self.pool.free_pages_needed(seq.tokens) > self.pool.num_free - owed:
        return  # it waits for pages; one that runs alone may still preempt to get them
      self._waiting.pop(0)
      self._running.append(seq)
      seq.pages = self.pool.match_prefix(seq.tokens)
      shared = len(seq.pages) * self.page_size
      if self.speculative and 0 < shared <= len(seq.tokens) - 1:
        shared -= 1  # the MTP entry of the shared pages' last position read the token after it
      seq.cached = min(shared, len(seq.tokens) - 1)
      owed += self.pool.pages_for(len(seq.tokens)) - len(seq.pages)

  def _prefill(self, outputs) -> None:
    self._admit()
    pending = sorted((s for s in self._running if not s.prefilled), key=lambda s: s.order)
    batch, copies = [], []
    for seq in pending[:self.prefill_rows]:
      if seq not in self._running:
        continue
      end = min(seq.cached + self.prefill_chunk, len(seq.tokens))
      runs, pairs = self._reserve(seq, end)
      if runs:
        batch.append((seq, end))
        copies += pairs
    batch = [(s, end) for s, end in batch if s in self._running]
    if not batch:
      return
    self.runner.copy(copies)
    width = max(end - seq.cached for seq, end in batch)
    rows = self._row_arrays(_bucket(self.prefill_row_buckets, len(batch)),
                            _bucket(self.prefill_width_buckets, width))
    for r, (seq, end) in enumerate(batch):
      self._fill_row(rows, r, seq, seq.tokens[seq.cached:end])
    drafts = None
    if self.speculative:  # the token after each chunk, -1 after a prompt's last: the sampled one
      rows["following"] = np.array([seq.tokens[end] if end < len(seq.tokens) else -1
                                    for seq, end in batch]
                                   + [-1] * (len(rows["lengths"]) - len(batch)), np.int32)
      result = self._run(rows, [s for s, _ in batch], outputs, self.runner.prefill)
      sampled, drafts, probs = (None,) * 3 if result is None else result
    else:
      sampled = self._run(rows, [s for s, _ in batch], outputs)
    if sampled is None:
      return
    self._stats["prefill_runs"] += 1
    for r, (seq, end) in enumerate(batch):
      self._stats["prefill_tokens"] += end - seq.cached
      before, seq.cached = seq.cached, end
      self._register(seq, before)
      if end == len(seq.tokens):  # the prompt (and any recomputed tokens) is in: a new token
        if drafts is not None:
          seq.drafts, seq.draft_probs = drafts[r], probs[r]
        self._accept(seq, int(sampled[r]), outputs)

  def _row_arrays(self, num_rows: int, width: int) -> dict[str, np.ndarray]:
    return {"tokens": np.zeros((num_rows, width), np.int32),
            "lengths": np.zeros((num_rows,), np.int32),
            "num_tokens": np.zeros((num_rows,), np.int32),
            "page_table": np.full((num_rows, self.pages_per_sequence), no_page(self.num_pages),
                                  np.int32),
            "temperature": np.zeros((num_rows,), np.float32),
            "top_k": np.zeros((num_rows,), np.int32),
            "top_p": np.ones((num_rows,), np.float32),
            "seeds": np.zeros((num_rows,), np.uint32),
            "token_index": np.zeros((num_rows,), np.int32)}

  def _fill_row(self, rows, r: int, seq: _Sequence, tokens: list[int]) -> None:
    s = seq.sampling
    rows["tokens"][r, :len(tokens)] = tokens
    rows["lengths"][r] = seq.cached
    rows["num_tokens"][r] = len(tokens)
    rows["page_table"][r, :len(seq.pages)] = seq.pages
    rows["temperature"][r] = s.temperature
    rows["top_k"][r] = s.top_k or 0
    rows["top_p"][r] = 1.0 if s.top_p is None else s.top_p
    rows["seeds"][r] = s.seed % 2**32
    rows["token_index"][r] = len(seq.generated)

  def _run(self, rows, batch: list[_Sequence], outputs, program=None):
    """A step program (runner.step by default) over rows; if it fails, every sequence in it
    ends with 'error' and None comes back."""
    try:
      return (program or self.runner.step)(**rows)
    except Exception as exc:  # a device or compile failure: the batch's requests end, not all
      message = f"{type(exc).__name__}: {exc}"
      print(f"mla-jax serve: step failed for {len(batch)} requests: {message}", file=sys.stderr)
      for seq in batch:
        self._finish(seq, "error", outputs, error=message)
      return None

  def _register(self, seq: _Sequence, before: int) -> None:
    """Offers the pages that became full since `before` cached tokens to the prefix cache."""
    if seq.cached // self.page_size > before // self.page_size:
      self.pool.register(seq.pages, seq.tokens[:seq.cached])

  def _accept(self, seq: _Sequence, token: int, outputs) -> None:
    if seq.first_token_s is None:
      seq.first_token_s = time.perf_counter()
    seq.generated.append(token)
    self._output(outputs, seq).new_tokens.append(token)
    if token in seq.sampling.stop_token_ids:
      self._finish(seq, "stop", outputs)
    elif len(seq.generated) >= seq.sampling.max_tokens:
      self._finish(seq, "length", outputs)

  # ---- offline and streaming use ---------------------------------------------------------

  def generate(self, prompts: Sequence, sampling: Union[SamplingParams,
                                                       Sequence[SamplingParams]] = SamplingParams()
               ) -> list[Completion]:
    """Runs every prompt to completion (like vLLM's LLM.generate) and returns their Completions
    in the prompts' order. sampling: one SamplingParams for all, or one per prompt. Every
    request is validated before any runs (add_request's errors)."""
    prompts = list(prompts)
    settings = ([sampling] * len(prompts) if isinstance(sampling, SamplingParams)
                else list(sampling))
    if len(settings) != len(prompts):
      raise ValueError(f"{len(settings)} SamplingParams for {len(prompts)} prompts")
    for prompt, s in zip(prompts, settings):  # all checked before any is queued
      self.validate_request(prompt, s)
    ids = [self.add_request(p, s) for p, s in zip(prompts, settings)]
    for request_id in ids:
      self._mailboxes[request_id] = collections.deque()
    done: dict[str, Completion] = {}
    try:
      while len(done) < len(ids):
        self._pump()
        for request_id in ids:
          for out in self._mailboxes[request_id]:
            if out.finished:
              done[request_id] = out.completion
          self._mailboxes[request_id].clear()
    finally:
      for request_id in ids:
        del self._mailboxes[request_id]
    return [done[i] for i in ids]

  def stream(self, prompt, sampling: SamplingParams = SamplingParams()) -> Iterator[int]:
    """Queues one request now and yields its tokens as the steps produce them (driving the
    engine itself; other queued requests run alongside, and several streams may be read in
    turn: each gets its own tokens). Closing the iterator cancels the request."""
    request_id = self.add_request(prompt, sampling)
    mailbox = self._mailboxes[request_id] = collections.deque()

    def tokens() -> Iterator[int]:
      finished = False
      try:
        while not finished:
          while not mailbox:
            self._pump()
          out = mailbox.popleft()
          finished = out.finished
          yield from out.new_tokens
      finally:
        if not finished:
          self.cancel(request_id)
          self._pump()
        del self._mailboxes[request_id]

    return tokens()


def bytes_per_page(config, page_size: int, cache_dtype: Optional[str] = None,
                   mtp: bool = False) -> int:
  """Bytes of one page of page_size token slots, all layers (the pools' storage: latent, scales
  and RoPE key for MLA; K and V for the baselines), and the MTP module's with mtp (speculative
  decoding): an engine with cache_budget_bytes B has B // bytes_per_page pages."""
  one_page = jax.eval_shape(lambda: init_paged_cache(config, 1, page_size, 1, 1, cache_dtype))
  return page_bytes(one_page) * (config.num_layers + mtp) // config.num_layers


def _bucket(buckets: tuple[int, ...], size: int) -> int:
  """The smallest bucket that holds `size`."""
  return next(b for b in buckets if b >= size)


def _linen_model(model, params) -> tuple[Transformer, Any]:
  """(Linen Transformer, plain parameters) from Engine(linen_model, params) or
  Engine(nnx_model)."""
  nnx = sys.modules.get("flax.nnx")
  if nnx is not None and isinstance(model, nnx.Module):
    if params is not None:
      raise TypeError("an NNX model holds its parameters: call Engine(model, ...) without params")
    model, params, _ = as_linen(model, None, None, "Engine")
    return model, params
  if not isinstance(model, Transformer):
    raise TypeError(f"Engine takes an mla_jax.Transformer with its params or an "
                    f"mla_jax.nnx.Transformer, got {type(model).__name__}")
  if params is None:
    raise TypeError("Engine(model, params, ...): the Linen Transformer takes its parameters as "
                    "an argument")
  from mla_jax.layers.params import unbox

  return model, unbox(params)
