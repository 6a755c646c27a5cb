"""`mla-jax serve`: an OpenAI-compatible HTTP server over the serving engine (FastAPI + uvicorn,
the optional "serve" extra).

Routes: POST /v1/completions (text or token-id prompts, streamed as server-sent events with
"stream": true), GET /v1/models, GET /health. One BackgroundEngine (background.py) drives the
engine; each request waits on its own queue, so any number of requests are served at once and
the engine batches them. A client that goes away mid-request has its request cancelled (its
cache pages are freed at the engine's next step).

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a body that
is not a JSON object, a field of the wrong type or value, a prompt too long for the model; 404
for another model's name; 503 while shutting down. The server keeps serving after each.

SIGTERM or Ctrl-C: new requests get 503 (and the listening socket closes), the running ones
finish, and those still running after --drain-timeout seconds end with finish_reason
"cancelled"; then the process exits 0. A second signal exits at once (130/143).

Each request is logged as one line on stderr: its id, status, prompt and output tokens, time to
first token, total time and finish reason (times from its arrival at the server).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import sys
import time
from typing import AsyncIterator, Callable, Optional

import fastapi
import uvicorn
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from mla_jax.interrupts import INTERRUPTS
from mla_jax.serving.background import BackgroundEngine, Draining, EngineFailed
from mla_jax.serving.openai_protocol import (CompletionRequest, Detokenizer, RequestError,
                                             error_body, parse_completion_request)

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is there


# ---- the app -------------------------------------------------------------------------------

@dataclasses.dataclass
class _Piece:
  """What one engine step gave a request: text, token ids, and its finish reason at the end."""

  text: str
  token_ids: list[int]
  finish_reason: Optional[str] = None


class _GenerationFailed(Exception):
  """The engine ended the request with finish_reason 'error' (its device program failed)."""


def _stderr_line(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def make_app(background: BackgroundEngine, model_name: str, tokenizer, *,
             eos_id: Optional[int] = None, drain_timeout_s: float = 30.0,
             log: Callable[[str], None] = _stderr_line) -> fastapi.FastAPI:
  """The FastAPI app over `background` (started by the app's lifespan; drained, then stopped,
  when the app shuts down, waiting at most drain_timeout_s seconds).

  model_name: the name /v1/models lists and requests may give as "model"; tokenizer:
  encode/decode (text prompts and text out), or None for token ids only (the text is then
  empty; every choice also carries its "token_ids"); eos_id: ends generation unless a request
  says ignore_eos; log: receives one line per request (default: stderr)."""
  engine = background.engine
  config = engine.config
  created = int(time.time())

  @contextlib.asynccontextmanager
  async def lifespan(app):
    background.start()
    yield
    cancelled = await asyncio.to_thread(background.shutdown, True, drain_timeout_s)
    if cancelled:
      log(f"mla-jax serve: cancelled {cancelled} requests still running after the drain")

  app = fastapi.FastAPI(title="mla-jax", lifespan=lifespan, docs_url=None, redoc_url=None)

  @app.exception_handler(HTTPException)
  async def http_error(request: fastapi.Request, exc: HTTPException):  # 404, 405: OpenAI's shape
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", kind),
                        status_code=exc.status_code)

  @app.get("/health")
  async def health():
    if background.failure is not None:
      return JSONResponse({"status": "failed", "error": background.failure}, status_code=503)
    if not background.admitting:
      return JSONResponse({"status": "draining"}, status_code=503)
    return {"status": "ok"}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "mla-jax",
                                        "max_model_len": config.max_seq_len}]}

  @app.post("/v1/completions")
  async def completions(request: fastapi.Request):
    arrival = time.perf_counter()
    try:
      parsed = parse_completion_request(
          await request.body(), model_name=model_name, tokenizer=tokenizer,
          vocab_size=config.vocab_size, max_seq_len=config.max_seq_len, eos_id=eos_id)
      try:
        request_id, stream = background.submit(parsed.prompt_tokens, parsed.sampling)
      except ValueError as err:  # what the engine refuses (e.g. more pages than the pool has)
        raise RequestError(str(err), getattr(err, "param", None)) from None
      except Draining as err:
        raise RequestError(str(err), status=503, type="server_error",
                           code="shutting_down") from None
      except EngineFailed as err:
        raise RequestError(f"the engine stopped ({err}); restart the server", status=503,
                           type="server_error", code="engine_failed") from None
    except RequestError as err:
      where = f" (param {err.param})" if err.param else ""
      log(f"mla-jax serve: rejected {err.status}{where}: {err.message}")
      return err.response()
    record = _Record(request_id, len(parsed.prompt_tokens), arrival, log)
    pieces = _pieces(background, request_id, stream, Detokenizer(tokenizer, parsed.stop), record)
    head = {"id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": model_name}
    if parsed.stream:
      return StreamingResponse(_sse(background, head, pieces, parsed, record),
                               media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _complete(background, request, head, pieces, record)

  return app


class _Record:
  """One request's log line: its counts and times, written once when it ends."""

  def __init__(self, request_id: str, prompt_tokens: int, arrival: float,
               log: Callable[[str], None]):
    self.request_id, self.prompt_tokens, self.arrival, self.log = (request_id, prompt_tokens,
                                                                   arrival, log)
    self.output_tokens = 0
    self.first_token: Optional[float] = None
    self.finish_reason: Optional[str] = None
    self.status = 200

  def tokens(self, count: int) -> None:
    if count and self.first_token is None:
      self.first_token = time.perf_counter()
    self.output_tokens += count

  def write(self) -> None:
    ttft = "-" if self.first_token is None else f"{self.first_token - self.arrival:.3f} s"
    self.log(f"mla-jax serve: {self.request_id} {self.status}: prompt {self.prompt_tokens} "
             f"tokens, output {self.output_tokens} tokens, ttft {ttft}, total "
             f"{time.perf_counter() - self.arrival:.3f} s, finish {self.finish_reason}")


async def _pieces(background: BackgroundEngine, request_id: str, stream, detok: Detokenizer,
                  record: _Record) -> AsyncIterator[_Piece]:
  """The request's RequestOutputs as text pieces; the last one has its finish reason. A stop
  string ends it with "stop" and cancels the engine's request. Raises _GenerationFailed for an
  'error' completion, EngineFailed if the driver stopped."""
  async for out in stream:
    record.tokens(len(out.new_tokens))
    completion = out.completion if out.finished else None
    # The engine's "stop" is a stop token, which ends its tokens and is not text.
    by_stop_token = completion is not None and completion.finish_reason == "stop"
    text = detok.add(out.new_tokens, final=out.finished, drop_last=by_stop_token)
    if detok.stopped:
      if not out.finished:
        background.cancel(request_id)
      yield _Piece(text, list(out.new_tokens), "stop")
      return
    if completion is not None:
      if completion.finish_reason == "error":
        raise _GenerationFailed(completion.error or "the engine's step failed")
      yield _Piece(text, list(out.new_tokens), completion.finish_reason)
      return
    if out.new_tokens:
      yield _Piece(text, list(out.new_tokens))


def _usage(record: _Record) -> dict:
  return {"prompt_tokens": record.prompt_tokens, "completion_tokens": record.output_tokens,
          "total_tokens": record.prompt_tokens + record.output_tokens}


def _choice(text: str, token_ids: list[int], finish_reason: Optional[str]) -> dict:
  return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason,
          "token_ids": token_ids}


def _event(data) -> str:
  return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _sse(background: BackgroundEngine, head: dict, pieces: AsyncIterator[_Piece],
               parsed: CompletionRequest, record: _Record) -> AsyncIterator[str]:
  """The streamed response: one `data: {chunk}` event per piece, the finish reason on the
  last, a usage chunk with stream_options.include_usage, then `data: [DONE]`. An engine
  failure is an `data: {"error": ...}` event before [DONE]. A client that disconnects closes
  this generator (asyncio.CancelledError or GeneratorExit at its await): its request is
  cancelled."""
  done = False
  try:
    try:
      async for piece in pieces:
        record.finish_reason = piece.finish_reason
        yield _event({**head, "choices": [_choice(piece.text, piece.token_ids,
                                                  piece.finish_reason)]})
      if parsed.include_usage:
        yield _event({**head, "choices": [], "usage": _usage(record)})
    except (_GenerationFailed, EngineFailed) as err:
      record.status, record.finish_reason = 500, "error"
      yield _event(error_body(str(err), "server_error"))
    yield "data: [DONE]\n\n"
    done = True
  finally:
    if not done:
      background.cancel(head["id"])
      record.finish_reason = "cancelled (the client disconnected)"
    record.write()


async def _complete(background: BackgroundEngine, request: fastapi.Request, head: dict,
                    pieces: AsyncIterator[_Piece], record: _Record) -> Response:
  """The whole completion as one JSON response; checks every DISCONNECT_POLL_S seconds that
  the client is still there, and cancels the request when it is not."""
  async def collect() -> tuple[str, list[int], Optional[str]]:
    text, ids, reason = [], [], None
    async for piece in pieces:
      text.append(piece.text)
      ids += piece.token_ids
      reason = piece.finish_reason
    return "".join(text), ids, reason

  task = asyncio.ensure_future(collect())
  try:
    while not task.done():
      await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
      if not task.done() and await request.is_disconnected():
        record.status, record.finish_reason = 499, "cancelled (the client disconnected)"
        return Response(status_code=499)  # no one reads it
    try:
      text, ids, record.finish_reason = task.result()
    except (_GenerationFailed, EngineFailed) as err:
      record.status, record.finish_reason = 500, "error"
      return JSONResponse(error_body(str(err), "server_error"), status_code=500)
    return JSONResponse({**head, "choices": [_choice(text, ids, record.finish_reason)],
                         "usage": _usage(record)})
  finally:
    if not task.done():  # the client left, or this handler was cancelled (the shutdown's grace
      task.cancel()      # ran out): the engine's request ends too
      background.cancel(head["id"])
      record.finish_reason = record.finish_reason or "cancelled"
    record.write()


# ---- `mla-jax serve` -----------------------------------------------------------------------

class _Server(uvicorn.Server):
  """uvicorn's server, with its signal handler draining the engine first: SIGTERM / Ctrl-C
  stops admitting (503), gives the running requests drain_timeout_s seconds, and asks uvicorn
  to shut down gracefully. Unlike uvicorn's own handler it does not re-raise the signal once
  the server has stopped, so a drained server exits 0. ready() is called once it listens."""

  def __init__(self, config: uvicorn.Config, background: BackgroundEngine,
               drain_timeout_s: float, ready: Callable[[], None]):
    super().__init__(config)
    self.background, self.drain_timeout_s, self.ready = background, drain_timeout_s, ready

  async def startup(self, sockets=None) -> None:
    await super().startup(sockets)
    if self.started:
      self.ready()

  @contextlib.contextmanager
  def capture_signals(self):
    """uvicorn's handlers (handle_exit), and while they are in place mla_jax.interrupts defers:
    its watcher lets the first signal through to handle_exit and exits at once on a second."""
    with super().capture_signals(), INTERRUPTS.deferred():
      yield

  def handle_exit(self, sig: int, frame) -> None:
    if self.background.admitting:
      self.background.stop_admitting(self.drain_timeout_s)
      running = self.background.num_unfinished
      # os.write: a signal handler must not print (the main thread may be inside a print).
      os.write(2, (f"mla-jax serve: {signal.Signals(sig).name}: stopped admitting (new "
                   f"requests get 503); draining {running} running request(s), at most "
                   f"{self.drain_timeout_s:g} s (--drain-timeout); a second signal stops at "
                   "once\n").encode())
    self.should_exit = True


def _bind(host: str, port: int) -> socket.socket:
  """A socket bound to host:port (not listening yet: uvicorn listens once the engine is
  ready). Raises ValueError naming the address when it cannot be bound."""
  try:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
  except OSError as err:
    raise ValueError(f"cannot serve on --host {host} --port {port}: "
                     f"{err.strerror or err}") from None
  return sock


def _positive(option: str, value):
  if value is not None and value < 1:
    raise ValueError(f"{option} {value} is invalid: must be a positive integer")
  return value


def engine_options(args) -> dict:
  """Engine keyword arguments from the command's options (the engine's defaults where an
  option is not given). Raises ValueError naming the option for a size that cannot work."""
  from mla_jax.bench.common import parse_bytes

  options = {"max_seqs": _positive("--max-seqs", args.max_seqs),
             "page_size": _positive("--page-size", args.page_size),
             "num_pages": _positive("--num-pages", args.num_pages),
             "prefill_chunk": _positive("--prefill-chunk", args.prefill_chunk),
             "cache_budget_bytes": (None if args.cache_budget is None
                                    else parse_bytes(args.cache_budget, "--cache-budget")),
             "cache_dtype": args.cache_dtype}
  options = {name: value for name, value in options.items() if value is not None}
  if args.no_prefix_sharing:
    options["prefix_sharing"] = False
  return options


def serve(args) -> int:
  """`mla-jax serve`: loads args.checkpoint's latest checkpoint into an Engine (which compiles
  its programs), and serves until SIGTERM / Ctrl-C, then drains and returns 0
  (1 if the engine's driver had failed). Raises ValueError (one line) for options that cannot
  work, before loading anything where it can tell."""
  from mla_jax.workdir import read_workdir_config

  if not 0 <= args.port <= 65535:
    raise ValueError(f"--port {args.port} is invalid: must be in 0..65535 (0: any free port)")
  if args.drain_timeout < 0:
    raise ValueError(f"--drain-timeout {args.drain_timeout:g} is invalid: must be >= 0 seconds")
  INTERRUPTS.set_stage("while loading the model; nothing was served")
  options = engine_options(args)
  read_workdir_config(args.checkpoint)  # a path that is not a workdir: refused before loading
  sock = _bind(args.host, args.port)
  model_name = args.served_model_name or args.checkpoint

  from mla_jax.runs import load_run
  from mla_jax.serving import Engine

  run = load_run(args.checkpoint)
  _stderr_line(f"mla-jax serve: loaded step {run.step} of {args.checkpoint}")
  start = time.perf_counter()
  engine = Engine(run.model, run.params, tokenizer=run.tokenizer, **options)  # compiles
  _stderr_line(f"mla-jax serve: engine ready in {time.perf_counter() - start:.1f} s: max_seqs "
               f"{engine.max_seqs}, {engine.num_pages:,} pages of {engine.page_size} tokens "
               f"({engine.num_pages * engine.bytes_per_page / 2**20:,.1f} MiB of cache)")

  background = BackgroundEngine(engine)
  app = make_app(background, model_name, run.tokenizer, eos_id=run.eos_id,
                 drain_timeout_s=args.drain_timeout)
  host, port = sock.getsockname()[:2]
  url = f"http://{f'[{host}]' if ':' in host else host}:{port}"

  def ready() -> None:
    _stderr_line(f"mla-jax serve: serving {model_name!r} on {url} (POST /v1/completions, GET "
                 "/v1/models, GET /health); SIGTERM or Ctrl-C drains and stops")

  # uvicorn's own grace outlasts the drain: by then every request has ended (the engine
  # cancels the stragglers at the deadline), so it only cuts off clients that stopped reading.
  # loop="asyncio": uvloop would take the signal wakeup fd that mla_jax.interrupts reads.
  config = uvicorn.Config(app, loop="asyncio", log_level="warning", access_log=False,
                          timeout_graceful_shutdown=math.ceil(args.drain_timeout) + 5)
  server = _Server(config, background, args.drain_timeout, ready)
  INTERRUPTS.set_stage("while draining the server: the running requests were cut off")
  server.run(sockets=[sock])  # the first signal drains (handle_exit), a second one exits
  _stderr_line(f"mla-jax serve: stopped; {engine.stats['steps']:,} engine steps")
  return 1 if background.failure is not None else 0
