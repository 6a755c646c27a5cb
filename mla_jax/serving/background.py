"""The engine on a thread of its own, for an asyncio server: BackgroundEngine.

Engine.step() is not thread-safe and blocks for as long as the model runs; add_request and
cancel are thread-safe. So one driver thread owns step(): it calls it while the engine has
unfinished requests, sleeps on a condition when there are none, and is woken by submit(). Each
RequestOutput a step returns goes to its request's asyncio.Queue through
loop.call_soon_threadsafe, on the event loop that submitted the request, so the HTTP handlers
only ever await their own queue and never block the loop.

Shutting down: stop_admitting() refuses new requests (submit raises Draining) and, with a
deadline, has the driver cancel whatever is still running once the deadline passes; shutdown()
then waits for the running requests (drain) or cancels them, and stops the thread. A cancelled
request ends like any other, with a final RequestOutput whose completion says 'cancelled'.

If step() itself raises (a bug; the engine turns a failed device program into 'error'
completions itself), the driver stops: every waiting stream raises EngineFailed, and so does
every later submit.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
import uuid
from typing import Optional, Sequence, Union


class Draining(RuntimeError):
  """submit() after stop_admitting() or shutdown(): the server is shutting down (HTTP 503)."""


class EngineFailed(RuntimeError):
  """The driver thread stopped on an exception from Engine.step(); the message names it."""


class RequestStream:
  """The RequestOutputs of one request, as an async iterator: `async for out in stream`.

  Iteration ends after the output with finished=True (its completion set). Raises EngineFailed
  if the driver stopped before the request finished. Only the event loop that submitted the
  request may iterate it."""

  def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
    self.request_id = request_id
    self.finished = False
    self._loop = loop
    self._queue: asyncio.Queue = asyncio.Queue()

  def __aiter__(self) -> "RequestStream":
    return self

  async def __anext__(self):
    if self.finished:
      raise StopAsyncIteration
    item = await self._queue.get()
    if isinstance(item, BaseException):
      self.finished = True
      raise item
    self.finished = item.finished
    return item

  def _push(self, item) -> None:
    """From the driver thread: hand `item` (a RequestOutput or an exception) to the loop. A
    loop that has closed (the server is gone) has no one left to tell."""
    try:
      self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
    except RuntimeError:
      pass


class BackgroundEngine:
  """Drives `engine` (an mla_jax.serving.Engine) from one daemon thread; see the module
  docstring. Call start() once, submit() from coroutines, shutdown() at the end.

  engine: the Engine (its stats, config and tokenizer stay readable as background.engine)."""

  def __init__(self, engine):
    self.engine = engine
    self._lock = threading.Lock()
    self._changed = threading.Condition(self._lock)  # new work, a stream ended, or stopping
    self._streams: dict[str, RequestStream] = {}  # requests submitted and not yet finished
    self._admitting = True
    self._stopping = False
    self._deadline: Optional[float] = None  # time.monotonic() after which running ones end
    self._failure: Optional[str] = None
    self._thread = threading.Thread(target=self._drive, name="mla-jax-engine", daemon=True)

  # ---- what the server calls -------------------------------------------------------------

  def start(self) -> None:
    """Starts the driver thread (once; later calls do nothing)."""
    if not self._thread.is_alive() and self._thread.ident is None:
      self._thread.start()

  def submit(self, prompt: Union[str, Sequence[int]], sampling,
             request_id: Optional[str] = None) -> tuple[str, RequestStream]:
    """Queues a request on the engine; returns (its id, its RequestStream). Must be called from
    a coroutine (the stream delivers to the running event loop).

    prompt: text (the engine's tokenizer encodes it) or token ids; sampling: a SamplingParams;
    request_id: default 'cmpl-' + 32 hex digits. Raises Draining once the server stopped
    admitting, EngineFailed after the driver failed, and Engine.add_request's ValueError
    (naming the field) for a request the engine refuses, before anything is queued."""
    loop = asyncio.get_running_loop()
    request_id = request_id or f"cmpl-{uuid.uuid4().hex}"
    with self._changed:
      if self._failure is not None:
        raise EngineFailed(self._failure)
      if not self._admitting:
        raise Draining("the server is shutting down and admits no new requests")
      stream = RequestStream(request_id, loop)
      # Under the lock, so that a shutdown in between cannot miss (or cancel too early) it.
      self.engine.add_request(prompt, sampling, request_id)
      self._streams[request_id] = stream
      self._changed.notify_all()
    return request_id, stream

  def cancel(self, request_id: str) -> None:
    """Cancels a request that has not finished (the engine frees its pages at its next step,
    and the stream ends with a 'cancelled' completion); does nothing for one that has. Safe
    from any thread."""
    with self._changed:
      if request_id in self._streams and self._failure is None:
        self.engine.cancel(request_id)
        self._changed.notify_all()

  @property
  def admitting(self) -> bool:
    """False once stop_admitting() or shutdown() was called."""
    return self._admitting

  @property
  def failure(self) -> Optional[str]:
    """Why the driver stopped ('ExceptionType: message'), or None while it runs."""
    return self._failure

  @property
  def num_unfinished(self) -> int:
    """Requests submitted that have not finished yet."""
    with self._lock:
      return len(self._streams)

  def stop_admitting(self, deadline_s: Optional[float] = None) -> None:
    """From now on submit() raises Draining. With deadline_s (seconds from now, >= 0), the
    driver cancels every request still unfinished once it passes. Safe from a signal handler:
    it only takes this object's lock, never held across an engine step."""
    with self._changed:
      self._admitting = False
      if deadline_s is not None:
        deadline = time.monotonic() + max(0.0, deadline_s)
        self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
      self._changed.notify_all()

  def shutdown(self, drain: bool = True, timeout: Optional[float] = None) -> int:
    """Stops admitting; with drain, waits up to `timeout` seconds (None: no bound) for the
    unfinished requests to finish; then cancels whatever is left, lets the driver end them
    and stops it. Blocks (call it off the event loop, e.g. with asyncio.to_thread). Returns how
    many requests it cancelled."""
    end = None if timeout is None else time.monotonic() + timeout
    with self._changed:
      self._admitting = False
      while drain and self._streams and self._failure is None:
        left = None if end is None else end - time.monotonic()
        if left is not None and left <= 0:
          break
        self._changed.wait(left)
      cancelled = list(self._streams) if self._failure is None else []
      for request_id in cancelled:
        self.engine.cancel(request_id)
      self._stopping = True
      self._changed.notify_all()
    if self._thread.ident is not None:
      self._thread.join()
    return len(cancelled)

  # ---- the driver thread -----------------------------------------------------------------

  def _drive(self) -> None:
    try:
      while True:
        with self._changed:
          while not self.engine.has_unfinished() and not self._stopping:
            self._changed.wait()
          if not self.engine.has_unfinished():  # stopping, and nothing left to end
            return
          if self._deadline is not None and time.monotonic() >= self._deadline:
            for request_id in self._streams:
              self.engine.cancel(request_id)
            self._deadline = None
        self._dispatch(self.engine.step())
    except Exception as exc:  # noqa: BLE001 -- reported to every waiting request, then stop
      self._fail(exc)

  def _dispatch(self, outputs) -> None:
    with self._changed:
      for out in outputs:
        stream = self._streams.get(out.request_id)
        if stream is None:  # added to the engine directly, not through submit()
          continue
        if out.finished:
          del self._streams[out.request_id]
          self._changed.notify_all()
        stream._push(out)

  def _fail(self, exc: Exception) -> None:
    message = f"{type(exc).__name__}: {exc}"
    print(f"mla-jax serve: the engine stopped: {message}", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)
    with self._changed:
      self._failure = message
      for stream in self._streams.values():
        stream._push(EngineFailed(f"the engine stopped: {message}"))
      self._streams.clear()
      self._changed.notify_all()
