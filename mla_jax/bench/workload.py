"""The serving benchmark's synthetic workload: seeded requests with log-normal prompt and output
lengths (a long tail, as real traffic has), prompts cut from this Python's standard-library
sources as byte tokens (the corpus `mla-jax train` uses), arriving all at once or as a Poisson
process.

Lengths: round(exp(N(log(median), sigma^2))), at least 1, and prompt + output at most `context`
(a prompt is cut to context - 1 tokens first, then its output to what is left), so the median is
the stated one and sigma sets the tail (sigma 1: one request in a hundred is about 10x the
median). Everything is a function of the seed alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from mla_jax.train.data import list_files


@dataclasses.dataclass(frozen=True)
class Request:
  """One request of the workload: its prompt (byte token ids), how many tokens it asks for, and
  when it arrives (seconds from the start of the run)."""

  prompt: tuple[int, ...]
  max_tokens: int
  arrival_s: float


@dataclasses.dataclass(frozen=True)
class Workload:
  """The requests in arrival order, and how they were drawn (for the table's notes)."""

  requests: tuple[Request, ...]
  description: str

  @property
  def prompt_tokens(self) -> int:
    return sum(len(r.prompt) for r in self.requests)

  @property
  def output_tokens(self) -> int:
    return sum(r.max_tokens for r in self.requests)

  def arriving_at(self, rate: Optional[float], seed: int) -> "Workload":
    """The same requests arriving all at once (rate None) or as a Poisson process of `rate`
    requests per second (exponential gaps, seeded)."""
    if rate is None:
      times = np.zeros(len(self.requests))
      arrivals = "all at once"
    else:
      gaps = np.random.default_rng([seed, 1]).exponential(1.0 / rate, len(self.requests))
      times = np.cumsum(gaps) - gaps[0]  # the first arrives at 0
      arrivals = f"Poisson arrivals at {rate:,.3g} requests/s"
    requests = tuple(dataclasses.replace(r, arrival_s=float(t))
                     for r, t in zip(self.requests, times))
    return Workload(requests, f"{self.description}; {arrivals}")


def log_normal_lengths(rng: np.random.Generator, n: int, median: float, sigma: float
                       ) -> np.ndarray:
  """n integers >= 1 drawn log-normally around `median` with shape `sigma`."""
  return np.maximum(np.rint(rng.lognormal(math.log(median), sigma, n)), 1).astype(int)


def corpus_prompts(rng: np.random.Generator, lengths: np.ndarray) -> list[tuple[int, ...]]:
  """A prompt of each length: a window of UTF-8 bytes at a random offset of a random standard
  library source file long enough to hold it (the byte tokenizer's ids are the bytes)."""
  files = list_files(None)
  sizes = np.array([f.stat().st_size for f in files])
  prompts = []
  for length in lengths:
    candidates = np.flatnonzero(sizes >= length)
    if not len(candidates):
      raise ValueError(f"no standard-library file holds a {length}-token prompt: ask for "
                       "shorter prompts")
    path = files[int(rng.choice(candidates))]
    data = path.read_bytes()
    start = int(rng.integers(0, len(data) - length + 1))
    prompts.append(tuple(data[start:start + int(length)]))
  return prompts


def make_workload(num_requests: int, *, prompt_median: float, output_median: float,
                  sigma: float, context: int, seed: int) -> Workload:
  """num_requests requests (all arriving at 0; see Workload.arriving_at). Raises ValueError for
  a count, median or context below 1, a negative sigma, or a context under 2 tokens."""
  if num_requests < 1:
    raise ValueError(f"--requests {num_requests} is invalid: must be >= 1")
  for name, value in (("--prompt-median", prompt_median), ("--output-median", output_median)):
    if not value >= 1:
      raise ValueError(f"{name} {value} is invalid: must be >= 1 token")
  if not sigma >= 0:
    raise ValueError(f"--sigma {sigma} is invalid: must be >= 0")
  if context < 2:
    raise ValueError(f"--context {context} is invalid: a request needs at least 2 tokens "
                     "(a prompt token and an output token)")
  rng = np.random.default_rng([seed, 0])
  prompt_lengths = np.minimum(log_normal_lengths(rng, num_requests, prompt_median, sigma),
                              context - 1)
  output_lengths = np.minimum(log_normal_lengths(rng, num_requests, output_median, sigma),
                              context - prompt_lengths)
  prompts = corpus_prompts(rng, prompt_lengths)
  requests = tuple(Request(p, int(m), 0.0) for p, m in zip(prompts, output_lengths))
  description = (f"{num_requests} requests, prompt and output lengths log-normal (medians "
                 f"{prompt_median:g} and {output_median:g} tokens, sigma {sigma:g}, prompt + "
                 f"output <= {context:,}; prompts from the standard library's sources, seed "
                 f"{seed})")
  return Workload(requests, description)
