"""What a serving request asks for and what it gets back: SamplingParams in, RequestOutput per
engine step and a Completion at the end (the engine's own bookkeeping is in engine.py)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from mla_jax.sampling import _is_integer, check_sampling, check_seed, check_token_id

FINISH_REASONS = ("length", "stop", "cancelled", "error")


class InvalidRequest(ValueError):
  """A request the engine refuses; `param` names the field at fault ('prompt', 'max_tokens',
  'temperature', ...), so a server can answer with it."""

  def __init__(self, message: str, param: str):
    super().__init__(message)
    self.param = param


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request is continued: max_tokens new tokens at most, stopping early after any of
  stop_token_ids (which is kept in the output); temperature 0 is greedy, else softmax sampling
  after top_k / top_p filtering (mla_jax.sampling.Sampler's semantics). Token i of the request is
  sampled with jax.random.fold_in(jax.random.key(seed), i), so a seeded request gives the same
  tokens whatever else the engine is running."""

  max_tokens: int = 16
  temperature: float = 0.0
  top_k: Optional[int] = None
  top_p: Optional[float] = None
  seed: int = 0
  stop_token_ids: tuple[int, ...] = ()

  def check(self, vocab_size: int) -> None:
    """Raises InvalidRequest (a ValueError) whose param names the first invalid field
    (check_sampling's rules, field by field; stop_token_ids must be token ids in
    [0, vocab_size))."""
    if not _is_integer(self.max_tokens) or self.max_tokens <= 0:
      raise InvalidRequest(f"max_tokens={self.max_tokens!r} is invalid: must be a positive "
                           "integer", "max_tokens")
    one_at_a_time = {  # each option checked with the others at their defaults
        "temperature": dict(temperature=self.temperature, top_k=None, top_p=None),
        "top_k": dict(temperature=0.0, top_k=self.top_k, top_p=None),
        "top_p": dict(temperature=0.0, top_k=None, top_p=self.top_p)}
    for field, settings in one_at_a_time.items():
      try:
        check_sampling(vocab_size, self.max_tokens, eos_id=None, **settings)
      except ValueError as err:
        raise InvalidRequest(str(err), field) from None
    try:
      check_seed(self.seed)
    except ValueError as err:
      raise InvalidRequest(str(err), "seed") from None
    if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(
        self.stop_token_ids, Sequence):
      raise InvalidRequest(f"stop_token_ids={self.stop_token_ids!r} is invalid: must be a "
                           "sequence of token ids", "stop_token_ids")
    for token in self.stop_token_ids:
      try:
        check_token_id("stop_token_ids", token, vocab_size)
      except ValueError as err:
        raise InvalidRequest(str(err), "stop_token_ids") from None


@dataclasses.dataclass
class Completion:
  """A finished request. Times are time.perf_counter() seconds; tokens are the generated ids (a
  stop token that ended it included); text is their decoding when the engine has a tokenizer."""

  request_id: str
  prompt_tokens: list[int]
  tokens: list[int]
  finish_reason: str  # one of FINISH_REASONS
  text: Optional[str]
  arrival_s: float
  first_token_s: Optional[float]
  finish_s: float
  num_preemptions: int = 0
  error: Optional[str] = None

  @property
  def ttft_s(self) -> Optional[float]:
    """Time to first token, seconds (None when none was produced)."""
    return None if self.first_token_s is None else self.first_token_s - self.arrival_s

  @property
  def total_s(self) -> float:
    return self.finish_s - self.arrival_s


@dataclasses.dataclass
class RequestOutput:
  """What one engine step did for one request: the tokens it produced (maybe none), and the
  Completion once it finished."""

  request_id: str
  new_tokens: list[int]
  finished: bool
  completion: Optional[Completion] = None
