"""The serving benchmark's workload: seeded, long-tailed, within the context, corpus prompts."""

import numpy as np
import pytest

from mla_jax.bench.workload import make_workload
from mla_jax.train.data import list_files


def test_the_workload_is_a_function_of_its_seed_and_respects_the_context():
  options = dict(prompt_median=40, output_median=20, sigma=1.0, context=128)
  a = make_workload(400, seed=3, **options)
  assert a == make_workload(400, seed=3, **options)
  assert a != make_workload(400, seed=4, **options)
  prompts = np.array([len(r.prompt) for r in a.requests])
  outputs = np.array([r.max_tokens for r in a.requests])
  assert prompts.min() >= 1 and outputs.min() >= 1 and (prompts + outputs).max() <= 128
  # log-normal around the medians (the cut at the context only trims the tail above them)
  assert 34 <= np.median(prompts) <= 46 and 16 <= np.median(outputs) <= 24
  assert prompts.max() > 3 * 40 * 0.8  # a long tail
  assert a.prompt_tokens == prompts.sum() and a.output_tokens == outputs.sum()
  assert all(r.arrival_s == 0 for r in a.requests)


def test_prompts_are_windows_of_standard_library_sources():
  workload = make_workload(5, prompt_median=30, output_median=4, sigma=0.5, context=256, seed=1)
  sources = [path.read_bytes() for path in list_files(None)]
  for request in workload.requests:
    window = bytes(request.prompt)
    assert any(window in source for source in sources)


def test_poisson_arrivals_have_the_asked_rate():
  workload = make_workload(2000, prompt_median=2, output_median=2, sigma=0, context=8, seed=0)
  at = workload.arriving_at(50.0, seed=0)
  times = np.array([r.arrival_s for r in at.requests])
  assert times[0] == 0 and np.all(np.diff(times) >= 0)
  assert np.mean(np.diff(times)) == pytest.approx(1 / 50, rel=0.06)
  assert [r.prompt for r in at.requests] == [r.prompt for r in workload.requests]
  assert "Poisson arrivals at 50 requests/s" in at.description
  assert workload.arriving_at(None, seed=0).requests == workload.requests


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_requests=0), "--requests 0 is invalid"),
    (dict(prompt_median=0.5), "--prompt-median 0.5 is invalid"),
    (dict(sigma=-1), "--sigma -1 is invalid"),
    (dict(context=1), "--context 1 is invalid"),
])
def test_bad_workloads_are_refused(kwargs, message):
  options = dict(num_requests=4, prompt_median=4, output_median=4, sigma=0.5, context=32, seed=0)
  options.update(kwargs)
  with pytest.raises(ValueError, match=message):
    make_workload(options.pop("num_requests"), **options)
