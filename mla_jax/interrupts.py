"""Ctrl-C (SIGINT) and SIGTERM: a clean one-line exit at any moment, nothing half-written.

Python runs signal handlers only between bytecodes of the main thread, so a signal that arrives
while XLA compiles (seconds of C++) would wait, and a KeyboardInterrupt raised in the middle of
JAX's machinery prints a traceback and can crash the interpreter at exit. Instead, CPython's C
handler writes the signal number to a wakeup pipe the moment it arrives (signal.set_wakeup_fd),
and a watcher thread reads it:

- outside `deferred()` (imports, data loading, compiling, initialising, sampling) nothing is
  being written that a later run needs, so the watcher prints one line and ends the process at
  once with os._exit(128 + signal number): 130 for SIGINT, 143 for SIGTERM, as shells report;
- inside `deferred()` (the training loop) it only records the request; the loop saves a
  checkpoint after the current step and returns. A second signal while deferred exits at once:
  orbax writes each checkpoint to a temporary directory and renames it when complete, so the
  last complete checkpoint stays the latest.

Before install() can run (the command's own imports and argument parsing), the `mla-jax`
command's first import, the mla_jax package, sets plain handlers that do the same immediate
exit (exit_on_signals_if_the_command); a program importing mla_jax keeps its own handlers.

Exit status: 128 + the signal number whenever a signal stopped the command, so a script can tell
an interrupted run (130, 143) from a finished one (0).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(name: str) -> int:
  """128 + the signal's number: 130 for SIGINT, 143 for SIGTERM."""
  return 128 + int(signal.Signals[name])


def exit_on_signals() -> None:
  """For the command's start-up, before `install()` can run (imports, argument parsing): a
  signal ends the process at once with one line and 128 + its number, instead of a
  KeyboardInterrupt traceback out of whichever import it hit. `install()` replaces these
  handlers, and puts them back when its block ends."""
  def handler(signum: int, frame) -> None:
    Interrupts._exit_now(signal.Signals(signum).name, INTERRUPTS.stage)

  for sig in SIGNALS:
    signal.signal(sig, handler)


def exit_on_signals_if_the_command() -> None:
  """exit_on_signals() when this process is the `mla-jax` command (its console script, or
  `python -m mla_jax.cli`); a program that imports mla_jax keeps its own signal handling."""
  script = os.path.basename(sys.argv[0]) if getattr(sys, "argv", None) else ""
  if script == "mla-jax" or list(getattr(sys, "orig_argv", []))[1:3] == ["-m", "mla_jax.cli"]:
    exit_on_signals()


class Interrupts:
  """Process-wide signal state; `install()` once from the main thread, then `deferred()` around
  work that can stop cleanly at a step boundary."""

  def __init__(self):
    self.requested: Optional[str] = None  # the signal's name, once one arrived while deferred
    self.stage = "before training started; no checkpoint was saved"  # said by an immediate exit
    self._deferred = False
    self._installed = False
    self._lock = threading.Lock()

  @contextlib.contextmanager
  def install(self) -> Iterator["Interrupts"]:
    """Routes SIGINT/SIGTERM to the watcher while the block runs (nested calls do nothing; off
    the main thread, where Python cannot set handlers, signals keep their default action)."""
    if self._installed or threading.current_thread() is not threading.main_thread():
      yield self
      return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in SIGNALS}
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watcher = threading.Thread(target=self._watch, args=(read_fd,), daemon=True,
                               name="mla-jax-signals")
    self._installed = True
    watcher.start()
    try:
      yield self
    finally:
      signal.set_wakeup_fd(previous_fd)
      for sig, handler in previous.items():
        signal.signal(sig, handler)
      self._installed = False
      os.close(write_fd)  # the watcher's read returns b"" and it ends
      watcher.join(timeout=5)
      os.close(read_fd)

  def _watch(self, read_fd: int) -> None:
    while True:
      data = os.read(read_fd, 1)
      if not data:
        return
      try:
        name = signal.Signals(data[0]).name
      except ValueError:
        continue
      if name not in {s.name for s in SIGNALS}:
        continue
      with self._lock:
        if self._deferred and self.requested is None:
          self.requested = name
          continue
        stage = self.stage if self.requested is None else f"again, without saving; {self.stage}"
      self._exit_now(name, stage)

  @staticmethod
  def _exit_now(name: str, stage: str) -> None:
    try:
      sys.stdout.flush()  # what was printed stays printed: os._exit flushes nothing
      sys.stderr.write(("\n" if sys.stderr.isatty() else "")  # end a progress bar's line
                       + f"mla-jax: stopped by {name} {stage}\n")
      sys.stderr.flush()
    finally:
      os._exit(exit_code(name))

  @contextlib.contextmanager
  def deferred(self) -> Iterator["Interrupts"]:
    """Inside the block a first signal only sets `requested`; a second one exits at once,
    saying `stage` (keep it current: e.g. which checkpoint is the last complete one)."""
    with self._lock:
      self._deferred, self.requested = True, None
    try:
      yield self
    finally:
      with self._lock:
        self._deferred = False

  def set_stage(self, text: str) -> None:
    """What an immediate exit says about the workdir, e.g. 'after step 1000 was saved'."""
    with self._lock:
      self.stage = text


INTERRUPTS = Interrupts()
