"""TEMPORARY, to be deleted when mla_jax.serving.Engine is merged into this branch: a stand-in
for the Engine (and, where mla_jax.serving.requests is missing, for its request types), built
to the contract in the lead's serving API so that the server and its tests can be written
before the engine lands. tests/test_serve.py uses the real Engine whenever it can be imported.

FakeEngine keeps the Engine's observable rules: add_request and cancel are thread-safe and
validate at once (ValueError naming the field); step() admits up to max_seqs requests while
pages last, gives each running request one token, and frees a request's pages the moment it
finishes or is cancelled; generate() drives step() itself. The tokens are a deterministic
function of the prompt, the seed and the token index (letters a-z), not a model's.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import threading
import time
import types
from typing import Optional, Sequence

try:
  from mla_jax.serving.requests import Completion, RequestOutput, SamplingParams
except ModuleNotFoundError:  # the contract's types, until requests.py is merged
  from mla_jax.sampling import check_sampling, check_seed, check_token_id

  @dataclasses.dataclass(frozen=True)
  class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0
    stop_token_ids: tuple = ()

    def check(self, vocab_size: int) -> None:
      if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or (
          self.max_tokens <= 0):
        raise ValueError(f"max_tokens={self.max_tokens!r} is invalid: must be a positive "
                         "integer")
      check_sampling(vocab_size, self.max_tokens, self.temperature, self.top_k, self.top_p,
                     None)
      check_seed(self.seed)
      for token in self.stop_token_ids:
        check_token_id("stop_token_ids", token, vocab_size)

  @dataclasses.dataclass
  class Completion:
    request_id: str
    prompt_tokens: list
    tokens: list
    finish_reason: str
    text: Optional[str]
    arrival_s: float
    first_token_s: Optional[float]
    finish_s: float
    num_preemptions: int = 0
    error: Optional[str] = None

    @property
    def ttft_s(self):
      return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def total_s(self):
      return self.finish_s - self.arrival_s

  @dataclasses.dataclass
  class RequestOutput:
    request_id: str
    new_tokens: list
    finished: bool
    completion: Optional[Completion] = None

  requests = types.ModuleType("mla_jax.serving.requests")
  requests.SamplingParams, requests.Completion, requests.RequestOutput = (
      SamplingParams, Completion, RequestOutput)
  sys.modules["mla_jax.serving.requests"] = requests


@dataclasses.dataclass
class _Seq:
  request_id: str
  prompt: list
  sampling: SamplingParams
  arrival_s: float
  generated: list = dataclasses.field(default_factory=list)
  pages: int = 0
  first_token_s: Optional[float] = None


class FakeEngine:
  """See the module docstring. step_s: seconds each step sleeps (a model's compute time)."""

  def __init__(self, *, vocab_size: int = 260, max_seq_len: int = 64, max_seqs: int = 8,
               page_size: int = 4, num_pages: Optional[int] = None, tokenizer=None,
               step_s: float = 0.002):
    self.config = types.SimpleNamespace(vocab_size=vocab_size, max_seq_len=max_seq_len)
    self.max_seqs, self.page_size, self.tokenizer, self.step_s = (max_seqs, page_size,
                                                                  tokenizer, step_s)
    self.num_pages = num_pages or max_seqs * -(-max_seq_len // page_size)
    self.bytes_per_page = 1024
    self._free = self.num_pages
    self._lock = threading.Lock()
    self._inbox: collections.deque = collections.deque()
    self._ids: set = set()
    self._count = 0
    self._waiting: list[_Seq] = []
    self._running: list[_Seq] = []
    self._stats = collections.Counter()

  def add_request(self, prompt, sampling: SamplingParams = SamplingParams(),
                  request_id: Optional[str] = None) -> str:
    sampling.check(self.config.vocab_size)
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise ValueError("prompt is text but the engine has no tokenizer")
      prompt = self.tokenizer.encode(prompt)
    tokens = list(prompt)
    if not tokens:
      raise ValueError("prompt is empty: every request needs at least one token")
    for i, token in enumerate(tokens):
      if not 0 <= token < self.config.vocab_size:
        raise ValueError(f"prompt token {i} is {token!r}: must be an integer id in [0, "
                         f"vocab_size={self.config.vocab_size})")
    total = len(tokens) + sampling.max_tokens
    if total > self.config.max_seq_len:
      raise ValueError(f"prompt ({len(tokens)} tokens) + max_tokens ({sampling.max_tokens}) = "
                       f"{total} exceeds model.max_seq_len ({self.config.max_seq_len})")
    if -(-total // self.page_size) > self.num_pages:
      raise ValueError(f"prompt + max_tokens = {total} tokens needs more pages than the pool's "
                       f"num_pages={self.num_pages}: give the engine more pages")
    with self._lock:
      if request_id is None:
        request_id = f"req-{self._count}"
      self._count += 1
      if request_id in self._ids:
        raise ValueError(f"request_id={request_id!r} is already in use")
      self._ids.add(request_id)
      self._inbox.append(("add", _Seq(request_id, tokens, sampling, time.perf_counter())))
    return request_id

  def cancel(self, request_id: str) -> None:
    with self._lock:
      if request_id not in self._ids:
        raise KeyError(f"no request {request_id!r}")
      self._inbox.append(("cancel", request_id))

  def has_unfinished(self) -> bool:
    with self._lock:
      return bool(self._inbox or self._waiting or self._running)

  @property
  def stats(self) -> dict:
    return {"running": len(self._running), "waiting": len(self._waiting),
            "pages_free": self._free, "pages_total": self.num_pages,
            "peak_running": self._stats["peak_running"], "preemptions": 0,
            "steps": self._stats["steps"]}

  def step(self) -> list:
    outputs: dict = {}
    with self._lock:
      items = list(self._inbox)
      self._inbox.clear()
    for kind, item in items:
      if kind == "add":
        self._waiting.append(item)
      else:
        seq = next((s for s in self._waiting + self._running if s.request_id == item), None)
        if seq is not None:
          self._finish(seq, "cancelled", outputs)
    self._stats["steps"] += 1
    time.sleep(self.step_s)
    while self._waiting and len(self._running) < self.max_seqs:
      seq = self._waiting[0]
      need = -(-(len(seq.prompt) + 1) // self.page_size)
      if need > self._free:
        break
      self._waiting.pop(0)
      self._free -= need
      seq.pages = need
      self._running.append(seq)
    self._stats["peak_running"] = max(self._stats["peak_running"], len(self._running))
    for seq in list(self._running):
      token = self._token(seq)
      length = len(seq.prompt) + len(seq.generated) + 1
      extra = -(-length // self.page_size) - seq.pages
      self._free -= extra
      seq.pages += extra
      seq.first_token_s = seq.first_token_s or time.perf_counter()
      seq.generated.append(token)
      out = outputs.setdefault(seq.request_id, RequestOutput(seq.request_id, [], False))
      out.new_tokens.append(token)
      if token in seq.sampling.stop_token_ids:
        self._finish(seq, "stop", outputs)
      elif len(seq.generated) >= seq.sampling.max_tokens:
        self._finish(seq, "length", outputs)
    return list(outputs.values())

  def _token(self, seq: _Seq) -> int:
    i = len(seq.generated)
    if seq.sampling.temperature == 0:
      return 97 + (sum(seq.prompt) * 31 + len(seq.prompt) + i * 7) % 26
    return 97 + (sum(seq.prompt) * 17 + seq.sampling.seed * 13 + i * 5) % 26

  def _finish(self, seq: _Seq, reason: str, outputs) -> None:
    self._free += seq.pages
    seq.pages = 0
    for queue in (self._waiting, self._running):
      if seq in queue:
        queue.remove(seq)
    tokens = list(seq.generated)
    text = None
    if self.tokenizer is not None:
      text = self.tokenizer.decode(tokens[:-1] if reason == "stop" else tokens)
    out = outputs.setdefault(seq.request_id, RequestOutput(seq.request_id, [], False))
    out.finished = True
    out.completion = Completion(seq.request_id, list(seq.prompt), tokens, reason, text,
                                seq.arrival_s, seq.first_token_s, time.perf_counter())

  def generate(self, prompts: Sequence, sampling=SamplingParams()) -> list:
    settings = ([sampling] * len(prompts) if isinstance(sampling, SamplingParams)
                else list(sampling))
    ids = [self.add_request(p, s) for p, s in zip(prompts, settings)]
    done: dict = {}
    while len(done) < len(ids):
      for out in self.step():
        if out.finished:
          done[out.request_id] = out.completion
    return [done[i] for i in ids]
