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
import secrets
import signal
import socket
import sys
import time
from typing import Any, AsyncIterator, Callable, Optional, Sequence

import fastapi
import uvicorn
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from mla_jax.interrupts import INTERRUPTS
from mla_jax.serving.background import BackgroundEngine, Draining, EngineFailed
from mla_jax.serving.requests import InvalidRequest, SamplingParams

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is there


# ---- errors --------------------------------------------------------------------------------

class RequestError(Exception):
  """A request the server refuses: HTTP `status`, OpenAI's error `type`, the `param` (request
  field) at fault or None, and an optional machine-readable `code`."""

  def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
               type: str = "invalid_request_error", code: Optional[str] = None):
    super().__init__(message)
    self.message, self.param, self.status, self.type, self.code = (message, param, status, type,
                                                                   code)

  def response(self) -> JSONResponse:
    return JSONResponse(error_body(self.message, self.type, self.param, self.code),
                        status_code=self.status)


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
  """OpenAI's error object."""
  return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- the request body ----------------------------------------------------------------------

@dataclasses.dataclass
class CompletionRequest:
  """A POST /v1/completions body, checked: the prompt's token ids, how to sample, and how to
  answer."""

  prompt_tokens: list[int]
  sampling: SamplingParams
  stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one found
  stream: bool = False
  include_usage: bool = False  # stream_options.include_usage: a last chunk with usage


def _type_name(value) -> str:
  return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
          dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _wrong_type(field: str, expected: str, value) -> RequestError:
  shown = json.dumps(value)
  shown = shown if len(shown) <= 40 else shown[:37] + "..."
  return RequestError(f"{field} must be {expected}, got {_type_name(value)} {shown}", field)


def _field(body: dict, field: str, check: Callable[[Any], bool], expected: str, default=None):
  """body[field] if it passes `check`; `default` when absent or null; RequestError naming the
  field otherwise."""
  value = body.get(field)
  if value is None:
    return default
  if not check(value):
    raise _wrong_type(field, f"{expected} or null", value)
  return value


def _prompt_tokens(prompt, tokenizer, vocab_size: int) -> list[int]:
  """The token ids of OpenAI's `prompt`: a string, a list of token ids, or a one-element list
  of either (a batch of several prompts is refused: send one request each)."""
  if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
    if len(prompt) > 1:
      raise RequestError(f"prompt holds {len(prompt)} prompts; mla-jax serve takes one prompt "
                         "per request: send one request each", "prompt")
    prompt = prompt[0]
  if isinstance(prompt, str):
    if not prompt:
      raise RequestError("prompt is empty: give at least one character", "prompt")
    if tokenizer is None:
      raise RequestError("this model has no tokenizer, so prompt must be a list of token ids "
                         "(its workdir has no tokenizer.json)", "prompt")
    tokens = list(tokenizer.encode(prompt))
    if not tokens:
      raise RequestError(f"prompt {prompt!r} encodes to no tokens", "prompt")
    return [int(t) for t in tokens]
  if not isinstance(prompt, list) or not all(_is_int(t) for t in prompt):
    raise _wrong_type("prompt", "a string or a list of token ids (integers)", prompt)
  if not prompt:
    raise RequestError("prompt is empty: give at least one token id", "prompt")
  for i, token in enumerate(prompt):
    if not 0 <= token < vocab_size:
      raise RequestError(f"prompt[{i}]={token} is outside the vocabulary (token ids 0 to "
                         f"{vocab_size - 1})", "prompt")
  return list(prompt)


def _refuse_unsupported(body: dict) -> None:
  """OpenAI fields this server does not implement: accepted at their no-op values, refused
  (naming the field) otherwise, rather than silently ignored."""
  n = _field(body, "n", _is_int, "an integer", 1)
  if n != 1:
    raise RequestError(f"n={n} is not supported: mla-jax serve returns one choice per request "
                       "(send n requests, with different seeds)", "n")
  best_of = _field(body, "best_of", _is_int, "an integer", 1)
  if best_of != 1:
    raise RequestError(f"best_of={best_of} is not supported (only 1)", "best_of")
  if _field(body, "echo", lambda v: isinstance(v, bool), "a boolean", False):
    raise RequestError("echo=true is not supported: the response holds the new text only",
                       "echo")
  if _field(body, "logprobs", _is_int, "an integer") is not None:
    raise RequestError("logprobs is not supported by mla-jax serve", "logprobs")
  if _field(body, "suffix", lambda v: isinstance(v, str), "a string"):
    raise RequestError("suffix is not supported by mla-jax serve", "suffix")
  for penalty in ("presence_penalty", "frequency_penalty"):
    if _field(body, penalty, _is_number, "a number", 0) != 0:
      raise RequestError(f"{penalty} is not supported by mla-jax serve (only 0)", penalty)
  if _field(body, "logit_bias", lambda v: isinstance(v, dict), "an object"):
    raise RequestError("logit_bias is not supported by mla-jax serve", "logit_bias")
  _field(body, "user", lambda v: isinstance(v, str), "a string")  # accepted, unused


def parse_completion_request(body: bytes, *, model_name: str, tokenizer, vocab_size: int,
                             max_seq_len: int, eos_id: Optional[int] = None) -> CompletionRequest:
  """A POST /v1/completions body (JSON bytes) -> CompletionRequest, or RequestError (400, or
  404 for another model's name) naming the field at fault.

  Fields: prompt (required: a string, a list of token ids, or a one-element list of either),
  model (this server's name, or absent), max_tokens (default 16), temperature (default 1),
  top_p, top_k (an extension; -1 = none, as vLLM spells it), seed (default: a random one per
  request), stop (a string or a list of strings; the text ends before the first), stop_token_ids
  (an extension; the ids end generation too), ignore_eos (an extension: do not stop at the
  tokenizer's EOS, which ends generation by default), stream, stream_options.include_usage, and
  n / best_of (1 only), echo (false only), logprobs, suffix, logit_bias, penalties (off only),
  user (ignored). Unknown fields are ignored, as OpenAI's server does.

  tokenizer: encode(str) -> ids, or None (token-id prompts only); vocab_size, max_seq_len: the
  model's; eos_id: the id that ends a sequence, or None."""
  try:
    data = json.loads(body)
  except (UnicodeDecodeError, json.JSONDecodeError) as err:
    raise RequestError(f"the request body is not valid JSON: {err}") from None
  if not isinstance(data, dict):
    raise RequestError(f"the request body must be a JSON object, got {_type_name(data)}")
  model = _field(data, "model", lambda v: isinstance(v, str), "a string")
  if model is not None and model != model_name:
    raise RequestError(f"the model {model!r} does not exist: this server serves {model_name!r} "
                       "(GET /v1/models)", "model", status=404, code="model_not_found")
  _refuse_unsupported(data)
  if "prompt" not in data or data["prompt"] is None:
    raise RequestError("prompt is required: a string or a list of token ids", "prompt")
  prompt = _prompt_tokens(data["prompt"], tokenizer, vocab_size)

  max_tokens = _field(data, "max_tokens", _is_int, "an integer", DEFAULT_MAX_TOKENS)
  if max_tokens < 1:
    raise RequestError(f"max_tokens={max_tokens} is invalid: must be a positive integer",
                       "max_tokens")
  if len(prompt) >= max_seq_len:
    raise RequestError(f"prompt is {len(prompt)} tokens, but the model's context length is "
                       f"max_seq_len={max_seq_len} tokens: it leaves no room for a new token; "
                       "shorten the prompt", "prompt", code="context_length_exceeded")
  if len(prompt) + max_tokens > max_seq_len:
    raise RequestError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) = "
                       f"{len(prompt) + max_tokens} exceeds the model's context length "
                       f"max_seq_len={max_seq_len}: lower max_tokens to at most "
                       f"{max_seq_len - len(prompt)}", "max_tokens",
                       code="context_length_exceeded")

  temperature = _field(data, "temperature", _is_number, "a number", DEFAULT_TEMPERATURE)
  top_p = _field(data, "top_p", _is_number, "a number")
  top_k = _field(data, "top_k", _is_int, "an integer")
  top_k = None if top_k == -1 else top_k
  seed = _field(data, "seed", _is_int, "an integer")
  seed = secrets.randbelow(2**32) if seed is None else seed

  stop = _field(data, "stop", lambda v: isinstance(v, (str, list)), "a string or a list of "
                "strings")
  stop = [stop] if isinstance(stop, str) else list(stop or [])
  if not all(isinstance(s, str) for s in stop):
    raise _wrong_type("stop", "a string or a list of strings", data["stop"])
  if any(not s for s in stop):
    raise RequestError("stop holds an empty string, which would match at once", "stop")
  stop_ids = _field(data, "stop_token_ids",
                    lambda v: isinstance(v, list) and all(_is_int(t) for t in v),
                    "a list of token ids (integers)", [])
  ignore_eos = _field(data, "ignore_eos", lambda v: isinstance(v, bool), "a boolean", False)
  if eos_id is not None and not ignore_eos:
    stop_ids = stop_ids + [eos_id]

  stream = _field(data, "stream", lambda v: isinstance(v, bool), "a boolean", False)
  options = _field(data, "stream_options", lambda v: isinstance(v, dict), "an object", {})
  if options and not stream:
    raise RequestError("stream_options is only allowed with stream: true", "stream_options")
  include_usage = _field(options, "include_usage", lambda v: isinstance(v, bool), "a boolean",
                         False)

  sampling = SamplingParams(max_tokens=max_tokens, temperature=float(temperature),
                            top_k=top_k, top_p=None if top_p is None else float(top_p),
                            seed=seed, stop_token_ids=tuple(dict.fromkeys(stop_ids)))
  try:
    sampling.check(vocab_size)
  except InvalidRequest as err:
    raise RequestError(str(err), err.param) from None
  return CompletionRequest(prompt, sampling, tuple(stop), stream, include_usage)


# ---- text out ------------------------------------------------------------------------------

class Detokenizer:
  """The text of a growing list of generated tokens, handed out as deltas that never change:
  a trailing incomplete UTF-8 character ("\\ufffd") is held back until it completes, and so is
  the end of the text that could begin a stop string, until it cannot. The text ends just before the first stop string found (OpenAI: the stop string is not
  part of the output).

  tokenizer: decode(ids) -> str, or None (the text is then always empty)."""

  def __init__(self, tokenizer, stop: Sequence[str] = ()):
    self.tokenizer = tokenizer
    self.stop = tuple(stop)
    self.tokens: list[int] = []
    self.text = ""  # handed out so far
    self.stopped = False  # a stop string was found

  def add(self, new_tokens: Sequence[int], final: bool = False, drop_last: bool = False) -> str:
    """Adds the tokens; returns the text that became final. final: no more tokens come (all
    held-back text is handed out); drop_last: the last token is a stop token, not text."""
    self.tokens += list(new_tokens)
    if self.tokenizer is None or self.stopped:
      return ""
    visible = self.tokens[:-1] if drop_last and self.tokens else self.tokens
    text = self.tokenizer.decode(visible)
    found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
    if found:
      end, self.stopped = min(found), True
    elif final:
      end = len(text)
    else:
      end = min(len(text.rstrip("\ufffd")), len(text) - self._stop_prefix(text))
    end = max(end, len(self.text))
    delta, self.text = text[len(self.text):end], text[:end]
    return delta

  def _stop_prefix(self, text: str) -> int:
    """The length of the longest end of `text` that begins a stop string (0 for none)."""
    longest = max(map(len, self.stop), default=1) - 1
    for length in range(min(longest, len(text)), 0, -1):
      if any(s.startswith(text[-length:]) for s in self.stop):
        return length
    return 0


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
