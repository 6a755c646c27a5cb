"""Seconds JAX spends compiling, from its own monitoring events: so `mla-jax generate` reports
compile time apart from generation, and `mla-jax bench serve` keeps compiles out of a timed run's
clock (a padded batch of a new shape compiles mid-run; the engine compiles ahead)."""

from __future__ import annotations

import time

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_total = [0.0]
_listening = [False]


def compile_seconds() -> float:
  """Seconds JAX has spent tracing, lowering and compiling in this process since the first call
  (the first call starts listening, so call it once before the work to be measured)."""
  if not _listening[0]:
    import jax

    def listen(event: str, duration: float, **kwargs) -> None:
      if event in _COMPILE_EVENTS:
        _total[0] += duration

    jax.monitoring.register_event_duration_secs_listener(listen)
    _listening[0] = True
  return _total[0]


class RunClock:
  """Seconds since start(), less the seconds JAX spent compiling since then."""

  def start(self) -> None:
    self._wall, self._compile = time.perf_counter(), compile_seconds()

  def now(self) -> float:
    return (time.perf_counter() - self._wall) - (compile_seconds() - self._compile)

  def sleep_until(self, t: float) -> None:
    """Waits until now() reaches t (compiles do not happen while waiting)."""
    wait = t - self.now()
    if wait > 0:
      time.sleep(wait)
