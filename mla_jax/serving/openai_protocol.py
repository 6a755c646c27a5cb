"""The OpenAI completions protocol for `mla-jax serve`: a /v1/completions request body checked
field by field into a CompletionRequest (OpenAI's names, types and defaults; every error names its
field), OpenAI's error body, and the Detokenizer that turns generated tokens into text deltas that
never change (held back across incomplete UTF-8 characters and possible stop strings).

Raises RequestError (status 400 with the field at fault as `param`) from
parse_completion_request; the server (server.py) sends it as OpenAI's error shape.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
from typing import Any, Callable, Optional, Sequence

from fastapi.responses import JSONResponse

from mla_jax.serving.requests import InvalidRequest, SamplingParams

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default


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

