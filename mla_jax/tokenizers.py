"""Tokenizers: mla-jax's byte-level one (what `mla-jax train` uses) and a Hugging Face
tokenizer.json behind the same small interface (encode, decode, EOS, PAD), chosen per workdir by
load_tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from mla_jax import workdir as layout


class ByteTokenizer:
  """UTF-8 bytes 0..255 plus EOS (ends each document), PAD and BOS."""

  EOS, PAD, BOS = 256, 257, 258
  vocab_size = 259

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    """Bytes back to text; special tokens are dropped, broken UTF-8 is replaced, not raised."""
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def _byte_chars() -> dict[int, str]:
  """GPT-2's byte -> printable character table, which the tokenizers library's ByteLevel
  pre-tokenizer and decoder use: printable Latin-1 bytes map to themselves, the others to
  characters from U+0100 on, in byte order."""
  kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
  moved = [b for b in range(256) if b not in kept]
  return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


BYTE_SPECIAL_TOKENS = {"<|eos|>": ByteTokenizer.EOS, "<|pad|>": ByteTokenizer.PAD,
                       "<|bos|>": ByteTokenizer.BOS}


def byte_tokenizer_json() -> str:
  """ByteTokenizer as a Hugging Face tokenizer.json (the tokenizers library's format): byte b is
  id b, then EOS, PAD and BOS as the special tokens <|eos|>, <|pad|>, <|bos|>; decoding joins the
  bytes as UTF-8 (invalid bytes become U+FFFD, as ByteTokenizer.decode does). Text encodes to
  the ids ByteTokenizer gives, except that a special token's own spelling in the text becomes
  its id."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

  vocab = {char: byte for byte, char in _byte_chars().items()}
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens([AddedToken(text, special=True)
                                for text in sorted(BYTE_SPECIAL_TOKENS, key=BYTE_SPECIAL_TOKENS.get)])
  return tokenizer.to_str()


class HFTokenizer:
  """A Hugging Face tokenizer.json (tokenizers library) behind ByteTokenizer's small interface."""

  def __init__(self, path: Path, eos_id: Optional[int]):
    from tokenizers import Tokenizer

    try:
      self._tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 -- tokenizers raises a bare Exception on a bad file
      raise ValueError(f"{path} is not a tokenizer the tokenizers library can read ("
                       f"{str(err).splitlines()[0] if str(err) else type(err).__name__}): copy "
                       "the model's tokenizer.json there again") from None
    self.vocab_size = self._tokenizer.get_vocab_size()
    self.EOS = eos_id
    self.PAD = 0 if eos_id is None else eos_id

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text).ids  # with the model's own BOS, as it was trained

  def decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(workdir: str | Path, vocab_size: Optional[int] = None):
  """The tokenizer of a workdir: its tokenizer.json (from `mla-jax convert`) if it has one, else
  mla-jax's byte tokenizer, the one `mla-jax train` uses.

  Raises ValueError, saying what to supply, where text cannot be tokenized right: a workdir
  converted from a Hugging Face directory that had no tokenizer.json (special_tokens.json marks a
  converted workdir), or a model whose vocab_size is too small for the byte tokenizer's ids.
  """
  tokenizer, missing = find_tokenizer(workdir, vocab_size)
  if tokenizer is None:
    raise ValueError(missing)
  return tokenizer


def optional_tokenizer(workdir: str | Path, vocab_size: Optional[int] = None):
  """load_tokenizer's tokenizer, or None where load_tokenizer would refuse for want of one (a
  converted model without tokenizer.json; a vocabulary too small for bytes). A tokenizer.json
  that cannot be read still raises ValueError."""
  return find_tokenizer(workdir, vocab_size)[0]


def eos_id(workdir: str | Path, tokenizer=None) -> Optional[int]:
  """The id that ends a sequence: `tokenizer`'s EOS (the workdir's, from optional_tokenizer),
  else special_tokens.json's eos_token_id (a converted model without tokenizer.json), else
  None."""
  from mla_jax.hf.safetensors import read_json

  if tokenizer is not None:
    return tokenizer.EOS
  special = layout.special_tokens_path(workdir)
  return read_json(special).get("eos_token_id") if special.is_file() else None


def find_tokenizer(workdir: str | Path, vocab_size: Optional[int] = None):
  """(tokenizer, None), or (None, the one-line reason there is none and what to supply), for
  load_tokenizer's cases; a tokenizer.json that cannot be read raises ValueError."""
  from mla_jax.hf.safetensors import read_json

  workdir = Path(workdir)
  path, special = layout.tokenizer_path(workdir), layout.special_tokens_path(workdir)
  eos = read_json(special).get("eos_token_id") if special.is_file() else None
  if path.is_file():
    return HFTokenizer(path, eos), None
  supply = (f"copy the model's tokenizer.json (from the Hugging Face directory or repository it "
            f"came from) into {workdir}")
  if special.is_file():
    return None, (f"{workdir} was converted from a checkpoint without tokenizer.json, so text "
                  f"prompts cannot be tokenized: {supply}")
  if vocab_size is not None and vocab_size < ByteTokenizer.vocab_size:
    return None, (f"{workdir} has no tokenizer.json and its model's vocab_size={vocab_size} is "
                  f"smaller than the byte tokenizer's {ByteTokenizer.vocab_size} ids, so it was "
                  f"not trained on bytes: {supply}")
  return ByteTokenizer(), None
