"""The OpenAI completions protocol (mla_jax/serving/openai_protocol.py) without a server: what
parse_completion_request takes from a body and refuses, and the detokenizer's deltas. The same
refusals through a live server are in tests/test_serve.py."""

import json

import pytest

from mla_jax.serving.openai_protocol import Detokenizer, RequestError, parse_completion_request
from mla_jax.tokenizers import ByteTokenizer

MODEL = "tiny-test"
EOS = ByteTokenizer.EOS


def test_engine_value_errors_are_400s_naming_the_field():
  """What the engine refuses (SamplingParams.check's ValueError) comes back naming the field."""
  parse = lambda body: parse_completion_request(
      json.dumps(body).encode(), model_name=MODEL, tokenizer=ByteTokenizer(), vocab_size=260,
      max_seq_len=64, eos_id=EOS)
  with pytest.raises(RequestError) as refused:
    parse({"prompt": "x", "top_k": 261})
  assert refused.value.param == "top_k" and refused.value.status == 400
  parsed = parse({"prompt": "ab", "top_k": -1, "stop_token_ids": [10, EOS], "stop": "\n\n"})
  assert parsed.prompt_tokens == [97, 98] and parsed.sampling.top_k is None
  assert parsed.sampling.stop_token_ids == (10, EOS) and parsed.stop == ("\n\n",)
  assert parsed.sampling.temperature == 1.0 and parsed.sampling.max_tokens == 16  # OpenAI's
  assert parse({"prompt": "x", "ignore_eos": True}).sampling.stop_token_ids == ()
  seeds = {parse({"prompt": "x"}).sampling.seed for _ in range(4)}
  assert len(seeds) > 1  # no seed: a fresh one per request, as OpenAI samples


def test_detokenizer_holds_back_partial_characters_and_stop_string_prefixes():
  tokenizer = ByteTokenizer()
  euro = list("€".encode())  # three bytes
  detok = Detokenizer(tokenizer)
  assert [detok.add([t]) for t in [97] + euro + [98]] == ["a", "", "", "€", "b"]
  detok = Detokenizer(tokenizer, stop=["STOP"])
  pieces = [detok.add(tokenizer.encode(c)) for c in "abcST"]
  assert "".join(pieces) == "abc" and not detok.stopped  # "ST" may begin "STOP"
  assert detok.add(tokenizer.encode("x")) == "STx"  # "STx" cannot any more
  assert detok.add(tokenizer.encode("yS")) == "y" and detok.add(tokenizer.encode("TOPz")) == ""
  assert detok.stopped and detok.text == "abcSTxy" and detok.add([97], final=True) == ""
  detok = Detokenizer(tokenizer, stop=["zz"])
  assert detok.add(tokenizer.encode("az")) == "a"
  assert detok.add([EOS], final=True, drop_last=True) == "z"  # the stop token is no text
  assert Detokenizer(None).add([1, 2], final=True) == ""  # no tokenizer: token ids only
