"""`mla-jax serve`: a real uvicorn server on 127.0.0.1 (an ephemeral port, in a thread) over the
engine, and a real HTTP client (httpx). What a client gets equals what the engine alone gives
for the same prompts; malformed requests get a 4xx naming the field and the server keeps
serving; a client that goes away has its request cancelled and its pages freed; a draining
server refuses new requests and ends the running ones; SIGTERM on the command drains and exits
0. The engine is the real Engine over a tiny random model.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import httpx
import pytest
import uvicorn

from mla_jax.serving import Engine, SamplingParams
from mla_jax.cli import main
from mla_jax.serving.background import BackgroundEngine
from mla_jax.serving.server import make_app
from mla_jax.tokenizers import ByteTokenizer
from tests.helpers import SMALL_MODEL

MLA_JAX = str(Path(sys.executable).parent / "mla-jax")
MODEL = "tiny-test"
EOS = ByteTokenizer.EOS
PROMPTS = [f"def f{i}(x):" for i in range(32)]
GREEDY = dict(max_tokens=8, temperature=0.0)


def make_engine(**options):
  """The Engine over a tiny random model (SMALL_MODEL: max_seq_len 64, the byte vocabulary),
  with the byte tokenizer."""
  import jax
  import jax.numpy as jnp

  import mla_jax

  config = mla_jax.load_config(None, *SMALL_MODEL, "train.seq_len=32").model
  model = mla_jax.Transformer(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return Engine(model, params, tokenizer=ByteTokenizer(), **options)


class LiveServer:
  """uvicorn serving `app` on 127.0.0.1 at a free port, in a thread, until stop()."""

  def __init__(self, app):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    self.server = uvicorn.Server(uvicorn.Config(app, loop="asyncio", log_level="warning",
                                                access_log=False))
    self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                   daemon=True)
    self.thread.start()
    deadline = time.monotonic() + 30
    while not self.server.started:
      assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
      time.sleep(0.01)

  def stop(self) -> None:
    self.server.should_exit = True
    self.thread.join(timeout=60)
    assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def engine():
  return make_engine(max_seqs=8)


@pytest.fixture(scope="module")
def reference(engine):
  """What the engine alone gives (Engine.generate, before any server drives it): each prompt's
  Completion, greedy with EOS stopping as the server sets it, and one sampled with seed 7."""
  greedy = engine.generate(PROMPTS, SamplingParams(**GREEDY, stop_token_ids=(EOS,)))
  (sampled,) = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=1.0,
                                                            seed=7, stop_token_ids=(EOS,)))
  (long,) = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=40, temperature=0.0))
  return types.SimpleNamespace(greedy=dict(zip(PROMPTS, greedy)), sampled=sampled, long=long)


@pytest.fixture
def served(engine, reference):
  """A live server over the module's engine, its BackgroundEngine and its log lines; after the
  test, the server is stopped and the engine holds no request and no page."""
  log: list[str] = []
  background = BackgroundEngine(engine)
  app = make_app(background, MODEL, ByteTokenizer(), eos_id=EOS, drain_timeout_s=5,
                 log=log.append)
  live = LiveServer(app)
  yield types.SimpleNamespace(url=live.url, background=background, log=log, engine=engine)
  live.stop()
  assert not engine.has_unfinished()
  assert engine.stats["pages_free"] == engine.stats["pages_total"]


def wait_until(condition, timeout: float = 30.0) -> None:
  deadline = time.monotonic() + timeout
  while not condition():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.01)


def slow_steps(monkeypatch, engine, seconds: float = 0.01) -> None:
  """Each engine step takes at least `seconds`, so a request is still running when the test
  acts on it."""
  step = engine.step

  def slow():
    time.sleep(seconds)
    return step()

  monkeypatch.setattr(engine, "step", slow)


def stream_events(lines) -> list:
  """The `data:` payloads of an SSE body's lines: dicts, and the final "[DONE]"."""
  events = []
  for line in lines:
    if line.startswith("data: "):
      payload = line[len("data: "):]
      events.append(payload if payload == "[DONE]" else json.loads(payload))
    else:
      assert line == "", line  # events are separated by blank lines, nothing else
  return events


# ---- the routes ----------------------------------------------------------------------------

def test_health_models_and_a_completion(served, reference):
  with httpx.Client(base_url=served.url, timeout=60) as client:
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == served.engine.config.max_seq_len
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS[0],
                                                    **GREEDY})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = reference.greedy[PROMPTS[0]]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["text"] == expected.text and choice["token_ids"] == expected.tokens
    assert choice["finish_reason"] == expected.finish_reason and choice["index"] == 0
    prompt_tokens = len(ByteTokenizer().encode(PROMPTS[0]))
    assert body["usage"] == {"prompt_tokens": prompt_tokens,
                             "completion_tokens": len(expected.tokens),
                             "total_tokens": prompt_tokens + len(expected.tokens)}
    sampled = client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 8,
                                                   "temperature": 1.0, "seed": 7}).json()
    assert sampled["choices"][0]["token_ids"] == reference.sampled.tokens
    # A prompt of token ids (OpenAI allows a list of ints) is the same request.
    ids = client.post("/v1/completions", json={"prompt": ByteTokenizer().encode(PROMPTS[0]),
                                               **GREEDY}).json()
    assert ids["choices"][0]["text"] == expected.text
  (line,) = [l for l in served.log if body["id"] in l]
  assert line.startswith(f"mla-jax serve: {body['id']} 200: prompt {prompt_tokens} tokens, "
                         f"output {len(expected.tokens)} tokens, ttft ")
  assert line.endswith(f" s, finish {expected.finish_reason}")


def test_32_concurrent_streams_equal_the_engine_alone(served, reference):
  """32 streaming requests at once (the engine runs 8 at a time): each one's text, put together
  from its chunks, is the engine's own Completion.text for that prompt."""
  async def one(client, prompt):
    async with client.stream("POST", "/v1/completions",
                             json={"prompt": prompt, "stream": True, **GREEDY,
                                   "stream_options": {"include_usage": True}}) as response:
      assert response.status_code == 200
      assert response.headers["content-type"].startswith("text/event-stream")
      return stream_events([line async for line in response.aiter_lines()])

  async def all_at_once():
    async with httpx.AsyncClient(base_url=served.url, timeout=120) as client:
      return await asyncio.gather(*(one(client, p) for p in PROMPTS))

  for prompt, events in zip(PROMPTS, asyncio.run(all_at_once())):
    expected = reference.greedy[prompt]
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.text
    assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == expected.tokens
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [
        expected.finish_reason]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["object"] == "text_completion"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(expected.tokens)
  assert served.engine.stats["peak_running"] > 1  # the requests were batched
  assert len([l for l in served.log if " 200: prompt " in l]) == 32


def test_stop_strings_end_the_text_before_them(served, reference):
  """OpenAI's `stop`: the text ends just before the first stop string (not included), with
  finish_reason "stop", streamed or not; the engine's request is cancelled there."""
  text = reference.long.text
  stop = text[5:7]
  expected = text[:text.find(stop)]
  body = {"prompt": PROMPTS[1], "max_tokens": 40, "temperature": 0, "ignore_eos": True,
          "stop": ["\x00never", stop]}
  with httpx.Client(base_url=served.url, timeout=60) as client:
    whole = client.post("/v1/completions", json=body).json()
    assert whole["choices"][0]["text"] == expected
    assert whole["choices"][0]["finish_reason"] == "stop"
    lines = client.post("/v1/completions", json={**body, "stream": True}).text.split("\n")
  events = stream_events(lines)
  assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected
  assert events[-2]["choices"][0]["finish_reason"] == "stop"
  wait_until(lambda: served.background.num_unfinished == 0)


# ---- malformed requests --------------------------------------------------------------------

MALFORMED = [
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "must be a JSON object, got array"),
    ({"max_tokens": 3}, 400, "prompt", "prompt is required"),
    ({"prompt": 5}, 400, "prompt", "prompt must be a string or a list of token ids"),
    ({"prompt": ""}, 400, "prompt", "prompt is empty"),
    ({"prompt": []}, 400, "prompt", "prompt is empty"),
    ({"prompt": [1, "a"]}, 400, "prompt", "must be a string or a list of token ids"),
    ({"prompt": [1, 999]}, 400, "prompt", "prompt[1]=999 is outside the vocabulary"),
    ({"prompt": [1, True]}, 400, "prompt", "got array"),
    ({"prompt": ["a", "b"]}, 400, "prompt", "takes one prompt per request"),
    ({"prompt": "x", "max_tokens": "16"}, 400, "max_tokens", "must be an integer or null"),
    ({"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens", "got number 1.5"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens", "max_tokens=-1 is invalid"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens=0 is invalid"),
    ({"prompt": "x", "max_tokens": 10**12}, 400, "max_tokens",
     "exceeds the model's context length max_seq_len=64: lower max_tokens to at most 63"),
    ({"prompt": "x" * 64, "max_tokens": 1}, 400, "prompt", "prompt is 64 tokens"),
    ({"prompt": "x" * 60, "max_tokens": 5}, 400, "max_tokens", "to at most 4"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature", "must be a number or null"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature", "temperature=-1.0 is invalid"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "top_p=0.0 is invalid"),
    ({"prompt": "x", "top_k": 0}, 400, "top_k", "top_k=0 is invalid"),
    ({"prompt": "x", "seed": "1"}, 400, "seed", "seed must be an integer or null"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream", "stream must be a boolean or null"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options",
     "only allowed with stream: true"),
    ({"prompt": "x", "stop": [1]}, 400, "stop", "stop must be a string or a list of strings"),
    ({"prompt": "x", "stop": ""}, 400, "stop", "empty string"),
    ({"prompt": "x", "stop_token_ids": [999]}, 400, "stop_token_ids",
     "stop_token_ids=999 is invalid"),
    ({"prompt": "x", "n": 2}, 400, "n", "n=2 is not supported"),
    ({"prompt": "x", "logprobs": 2}, 400, "logprobs", "not supported"),
    ({"prompt": "x", "echo": True}, 400, "echo", "not supported"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "the model 'gpt-4' does not exist"),
]


def test_malformed_requests_name_the_field_and_the_server_keeps_serving(served):
  with httpx.Client(base_url=served.url, timeout=60) as client:
    for body, status, param, message in MALFORMED:
      if isinstance(body, bytes):
        response = client.post("/v1/completions", content=body,
                               headers={"content-type": "application/json"})
      else:
        response = client.post("/v1/completions", json=body)
      assert response.status_code == status, (body, response.text)
      error = response.json()["error"]
      assert error["type"] == "invalid_request_error" and error["param"] == param, (body, error)
      assert message in error["message"], (body, error["message"])
      ok = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2,
                                                "unknown_field": [1, 2]})  # extras are ignored
      assert ok.status_code == 200, (body, ok.text)
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == (
        "GET /v1/nothing: Not Found")
    assert client.get("/v1/completions").status_code == 405
  rejected = [l for l in served.log if l.startswith("mla-jax serve: rejected ")]
  assert len(rejected) == len(MALFORMED)
  assert "rejected 400 (param max_tokens): max_tokens=-1 is invalid" in "\n".join(rejected)


# ---- clients that go away ------------------------------------------------------------------

def test_a_client_that_disconnects_mid_stream_frees_its_pages(served, monkeypatch):
  slow_steps(monkeypatch, served.engine)

  async def read_one_chunk_and_leave():
    async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
      async with client.stream("POST", "/v1/completions", json={
          "prompt": "x", "max_tokens": 60, "temperature": 0, "ignore_eos": True,
          "stream": True}) as response:
        async for line in response.aiter_lines():
          if line.startswith("data: {"):
            return json.loads(line[6:])["id"]

  request_id = asyncio.run(read_one_chunk_and_leave())
  wait_until(lambda: served.background.num_unfinished == 0)
  wait_until(lambda: not served.engine.has_unfinished())
  stats = served.engine.stats
  assert stats["pages_free"] == stats["pages_total"] and stats["running"] == 0
  (line,) = [l for l in served.log if request_id in l]
  assert line.endswith("finish cancelled (the client disconnected)")
  assert int(line.split("output ")[1].split()[0]) < 60


def test_a_client_that_disconnects_before_a_whole_completion_frees_its_pages(served,
                                                                              monkeypatch):
  slow_steps(monkeypatch, served.engine)
  body = json.dumps({"prompt": "x", "max_tokens": 60, "temperature": 0,
                     "ignore_eos": True}).encode()
  host, port = served.url.removeprefix("http://").split(":")
  with socket.create_connection((host, int(port))) as sock:
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    wait_until(lambda: served.background.num_unfinished == 1)
  wait_until(lambda: served.background.num_unfinished == 0)
  wait_until(lambda: not served.engine.has_unfinished())
  assert served.engine.stats["pages_free"] == served.engine.stats["pages_total"]
  (line,) = [l for l in served.log if l.startswith("mla-jax serve: cmpl-")]
  assert " 499: " in line and line.endswith("finish cancelled (the client disconnected)")


# ---- shutting down -------------------------------------------------------------------------

def test_a_draining_server_refuses_new_requests_with_503(served):
  served.background.stop_admitting()
  with httpx.Client(base_url=served.url, timeout=60) as client:
    response = client.post("/v1/completions", json={"prompt": "x"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "shutting_down"
    health = client.get("/health")
    assert health.status_code == 503 and health.json() == {"status": "draining"}


def test_the_drain_deadline_ends_running_streams_cleanly(served, monkeypatch):
  """Past the deadline the engine cancels what still runs: the stream ends with
  finish_reason "cancelled" and [DONE], and the pages are free."""
  slow_steps(monkeypatch, served.engine)
  with httpx.Client(base_url=served.url, timeout=60) as client:
    with client.stream("POST", "/v1/completions", json={
        "prompt": "x", "max_tokens": 60, "temperature": 0, "ignore_eos": True,
        "stream": True}) as response:
      lines = []
      for line in response.iter_lines():
        lines.append(line)
        if len(lines) == 1:
          served.background.stop_admitting(deadline_s=0)
  events = stream_events(lines)
  assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "cancelled"
  assert len(sum((e["choices"][0]["token_ids"] for e in events[:-1]), [])) < 60
  wait_until(lambda: not served.engine.has_unfinished())
  assert served.engine.stats["pages_free"] == served.engine.stats["pages_total"]


def test_shutdown_waits_for_running_requests_then_stops_the_driver(engine, reference):
  """BackgroundEngine.shutdown(drain=True): the running request finishes (not cancelled), then
  the driver thread ends; later submits are refused."""
  from mla_jax.serving.background import Draining

  background = BackgroundEngine(engine)
  background.start()

  async def run():
    _, stream = background.submit(ByteTokenizer().encode(PROMPTS[2]),
                                  SamplingParams(**GREEDY, stop_token_ids=(EOS,)))
    stopping = asyncio.ensure_future(asyncio.to_thread(background.shutdown, True, 30))
    outputs = [out async for out in stream]
    assert await stopping == 0  # nothing was left to cancel
    with pytest.raises(Draining):
      background.submit([1], SamplingParams())
    return outputs

  outputs = asyncio.run(run())
  assert outputs[-1].finished and outputs[-1].completion.tokens == (
      reference.greedy[PROMPTS[2]].tokens)
  assert not background._thread.is_alive()


class BrokenEngine:
  """An engine whose device program fails: each request ends with finish_reason "error", as
  the Engine ends a batch whose step program raised; a prompt of [13] makes step() itself
  raise, which stops the driver."""

  config = types.SimpleNamespace(vocab_size=260, max_seq_len=64)

  def __init__(self):
    self.added: list = []

  def add_request(self, prompt, sampling, request_id):
    self.added.append((request_id, list(prompt)))
    return request_id

  def cancel(self, request_id):
    pass

  def has_unfinished(self):
    return bool(self.added)

  def step(self):
    request_id, prompt = self.added.pop(0)
    if prompt == [13]:
      raise RuntimeError("a bug in step")
    failed = types.SimpleNamespace(finish_reason="error", tokens=[],
                                   error="XlaRuntimeError: RESOURCE_EXHAUSTED")
    return [types.SimpleNamespace(request_id=request_id, new_tokens=[], finished=True,
                                  completion=failed)]


def test_engine_failures_are_500s_and_a_stopped_driver_is_503():
  log: list[str] = []
  background = BackgroundEngine(BrokenEngine())
  live = LiveServer(make_app(background, MODEL, ByteTokenizer(), log=log.append))
  try:
    with httpx.Client(base_url=live.url, timeout=60) as client:
      failed = client.post("/v1/completions", json={"prompt": [1]})
      assert failed.status_code == 500
      assert failed.json()["error"] == {"message": "XlaRuntimeError: RESOURCE_EXHAUSTED",
                                        "type": "server_error", "param": None, "code": None}
      events = stream_events(client.post("/v1/completions", json={
          "prompt": [1], "stream": True}).text.split("\n"))
      assert events == [{"error": failed.json()["error"]}, "[DONE]"]
      stopped = client.post("/v1/completions", json={"prompt": [13]})
      assert stopped.status_code == 500
      assert stopped.json()["error"]["message"] == (
          "the engine stopped: RuntimeError: a bug in step")
      health = client.get("/health")
      assert health.status_code == 503 and health.json() == {
          "status": "failed", "error": "RuntimeError: a bug in step"}
      refused = client.post("/v1/completions", json={"prompt": [1]})
      assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_failed"
  finally:
    live.stop()
  assert sum(" 500: " in line and line.endswith("finish error") for line in log) == 3


# ---- the command ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
  """A workdir holding a tiny random model (SMALL_MODEL with max_seq_len 256) at step 0, as
  `mla-jax convert` writes one: config.yaml and a parameters-only checkpoint; the byte
  tokenizer (no tokenizer.json)."""
  import jax
  import jax.numpy as jnp

  import mla_jax
  from mla_jax.checkpoint import Checkpoints
  from mla_jax.workdir import write_config

  workdir = tmp_path_factory.mktemp("serve") / "tiny"
  config = mla_jax.load_config(None, *SMALL_MODEL, "model.max_seq_len=256",
                               f"workdir={workdir}")
  params = mla_jax.Transformer(config.model).init(jax.random.key(0),
                                                  jnp.zeros((1, 4), jnp.int32))["params"]
  workdir.mkdir(parents=True)
  checkpoints = Checkpoints(workdir, keep=1)
  try:
    checkpoints.save_params(0, params, {"model": config.model.to_dict()})
  finally:
    checkpoints.close()
  write_config(workdir, config)
  return workdir


@pytest.mark.parametrize("flags, message", [
    (["--max-seqs", "0"], "--max-seqs 0 is invalid: must be a positive integer"),
    (["--cache-budget", "lots"], "--cache-budget 'lots' is invalid: expected a size such as"),
    (["--port", "70000"], "--port 70000 is invalid: must be in 0..65535"),
    (["--drain-timeout", "-1"], "--drain-timeout -1 is invalid: must be >= 0 seconds"),
])
def test_options_that_cannot_work_are_one_line(flags, message, tiny_workdir, capsys):
  assert main(["serve", "--checkpoint", str(tiny_workdir), *flags]) == 2
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith(f"mla-jax: error: {message}"), line


def test_the_engine_options_are_the_engines_keywords():
  from mla_jax.cli import build_parser
  from mla_jax.serving.server import engine_options

  parse = lambda *flags: engine_options(build_parser().parse_args(["serve", "--checkpoint", "w",
                                                                   *flags]))
  assert parse() == {}  # the engine's own defaults
  assert parse("--max-seqs", "4", "--page-size", "8", "--cache-budget", "64MiB",
               "--prefill-chunk", "32", "--cache-dtype", "int8", "--no-prefix-sharing") == {
      "max_seqs": 4, "page_size": 8, "cache_budget_bytes": 64 * 2**20, "prefill_chunk": 32,
      "cache_dtype": "int8", "prefix_sharing": False}
  assert parse("--num-pages", "100") == {"num_pages": 100}
  with pytest.raises(SystemExit):  # one or the other
    build_parser().parse_args(["serve", "--checkpoint", "w", "--num-pages", "1",
                               "--cache-budget", "1MiB"])


def test_a_port_in_use_and_a_path_that_is_no_workdir_are_one_line(tiny_workdir, tmp_path,
                                                                  capsys):
  with socket.create_server(("127.0.0.1", 0)) as taken:
    port = taken.getsockname()[1]
    assert main(["serve", "--checkpoint", str(tiny_workdir), "--port", str(port)]) == 2
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith(f"mla-jax: error: cannot serve on --host 127.0.0.1 --port {port}: "
                         "Address already in use"), line
  assert main(["serve", "--checkpoint", str(tmp_path / "nope")]) == 2
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith("mla-jax: error: ") and str(tmp_path / "nope") in line, line


def test_without_the_serve_extra_the_command_says_what_to_install(tiny_workdir):
  code = textwrap.dedent("""
      import importlib.abc, sys

      class NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in ("fastapi", "uvicorn"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

      sys.meta_path.insert(0, NotInstalled())
      from mla_jax.cli import main
      sys.exit(main(sys.argv[1:]))
  """)
  result = subprocess.run([sys.executable, "-c", code, "serve", "--checkpoint",
                           str(tiny_workdir)], capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr == ("mla-jax: error: mla-jax serve needs FastAPI and uvicorn (fastapi is "
                           'not installed): pip install -e ".[serve]"\n')


def test_sigterm_drains_the_running_request_and_exits_0(tiny_workdir):
  """`mla-jax serve` as a user runs it: SIGTERM while a request streams; the request runs to
  its end (finish_reason "length", all its tokens), a new connection is not served, and the
  process exits 0."""
  process = subprocess.Popen([MLA_JAX, "serve", "--checkpoint", str(tiny_workdir), "--port",
                              "0", "--served-model-name", MODEL, "--max-seqs", "4"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    err = []
    while True:  # the address is on the "serving" line, printed once the server listens
      line = process.stderr.readline()
      assert line, (process.poll(), "".join(err))
      err.append(line)
      if " on http://" in line:
        url = line.split(" on ")[1].split()[0]
        break
    with httpx.Client(base_url=url, timeout=120) as client:
      assert client.get("/health").json() == {"status": "ok"}
      with client.stream("POST", "/v1/completions", json={
          "prompt": "def ", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
          "stream": True}) as response:
        lines = []
        for line in response.iter_lines():
          lines.append(line)
          if len(lines) == 1:
            process.send_signal(signal.SIGTERM)
    events = stream_events(lines)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert len(sum((e["choices"][0]["token_ids"] for e in events[:-1]), [])) == 200
    with pytest.raises(httpx.TransportError):  # the listening socket is closed
      httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=10)
    out, rest = process.communicate(timeout=120)
  finally:
    if process.poll() is None:
      process.kill()
  stderr = "".join(err) + rest
  assert process.returncode == 0, stderr
  assert "mla-jax serve: SIGTERM: stopped admitting (new requests get 503); draining 1 " \
         "running request(s)" in stderr
  assert "output 200 tokens" in stderr and "finish length" in stderr
  assert "Traceback" not in stderr
