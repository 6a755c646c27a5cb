"""Training text: the corpus on disk, and batches as a pure function of step.

The default corpus is the running Python's standard library sources: real text, on every machine,
no download. Files are split into train and validation by a hash of their relative path, so the
split does not depend on file order or count. A batch is a function of (seed, step) alone, so a
resumed run sees exactly the batches an unbroken one would. Written by hand rather than with
grain: sampling random windows from one in-memory array is a few lines and needs no workers.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import hashlib
import sysconfig
from pathlib import Path
from typing import Optional

import numpy as np

from mla_jax.config.run import DataConfig
from mla_jax.tokenizers import ByteTokenizer

TRAIN_STREAM, VAL_STREAM = 0, 1  # batch_at's streams: training batches, fixed validation batches

# The text check reads a bounded prefix of each file (never a whole one: a device such as
# /dev/zero never ends) before anything is loaded. Text in any language, as UTF-8, has no
# non-text bytes; executables, archives and compressed or numeric data are mostly non-text.
SAMPLE_BYTES = 8192  # per file
MAX_SAMPLED_FILES = 4096  # spread evenly over a larger corpus
MAX_NON_TEXT = 0.10  # the largest share of non-text bytes a corpus (or a file, for the note) has
_CONTROL = bytes(b for b in range(32) if b not in b"\t\n\v\f\r\x1b") + b"\x7f"


def stdlib_root() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def list_files(path: Optional[str]) -> list[Path]:
  """The files of a data path (file, directory or glob), sorted; the stdlib's *.py for None."""
  if path is None:
    root = stdlib_root()
    return sorted(p for p in root.rglob("*.py")
                  if "site-packages" not in p.relative_to(root).parts and p.is_file())
  target = Path(path).expanduser()
  if target.is_file() or (target.exists() and not target.is_dir()):  # a device: text-checked
    return [target]
  if target.is_dir():
    return sorted(p for p in target.rglob("*") if p.is_file())
  return sorted(Path(p) for p in glob.glob(str(target), recursive=True) if Path(p).is_file())


def _is_validation(relative: str, val_fraction: float) -> bool:
  digest = int.from_bytes(hashlib.sha256(relative.encode()).digest()[:8], "big")
  return digest / 2**64 < val_fraction


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Token streams: each file's bytes followed by EOS, concatenated. uint16 ids."""

  train: np.ndarray  # [N_train]
  val: np.ndarray  # [N_val]
  num_files: int
  source: str
  binary_files: tuple[tuple[str, float], ...] = ()  # (path, non-text share) of files over the limit


def _tokens(chunks: list[bytes]) -> np.ndarray:
  if not chunks:
    return np.zeros((0,), np.uint16)
  pieces = []
  for chunk in chunks:
    pieces.append(np.frombuffer(chunk, np.uint8).astype(np.uint16))
    pieces.append(np.array([ByteTokenizer.EOS], np.uint16))
  return np.concatenate(pieces)


def non_text_bytes(data: bytes) -> int:
  """How many bytes of `data` are not text: control bytes other than tab, newlines, form feed and
  escape, and bytes of invalid UTF-8 (a character cut at the end of `data` is not counted)."""
  control = len(data) - len(data.translate(None, _CONTROL))
  invalid = [0]

  def count(err: UnicodeDecodeError) -> tuple[str, int]:
    invalid[0] += err.end - err.start
    return "", err.end

  codecs.register_error("mla_jax.count_invalid_utf8", count)
  codecs.getincrementaldecoder("utf-8")("mla_jax.count_invalid_utf8").decode(data, final=False)
  return control + invalid[0]


def _sample(path: Path) -> bytes:
  """The first SAMPLE_BYTES of a file; an unreadable one is a ValueError naming it."""
  try:
    with open(path, "rb") as f:
      return f.read(SAMPLE_BYTES)
  except OSError as err:
    raise ValueError(f"data file {str(path)!r} cannot be read ({err.strerror})") from None


def check_text(files: list[Path], name: str) -> tuple[tuple[str, float], ...]:
  """Samples a prefix of each file (at most MAX_SAMPLED_FILES, evenly spread) and returns the
  (path, share) of files whose non-text share exceeds MAX_NON_TEXT, so they can be reported.

  Raises ValueError naming `name` (data.path=...) and the share when more than MAX_NON_TEXT of
  all sampled bytes are not text: a binary file, a directory of binaries, a device."""
  stride = max(1, -(-len(files) // MAX_SAMPLED_FILES))
  sampled, non_text, binary = 0, 0, []
  for path in files[::stride]:
    data = _sample(path)
    bad = non_text_bytes(data)
    sampled, non_text = sampled + len(data), non_text + bad
    if data and bad / len(data) > MAX_NON_TEXT:
      binary.append((str(path), bad / len(data)))
  if sampled and non_text / sampled > MAX_NON_TEXT:
    files_read = len(files[::stride])
    example = f"; e.g. {binary[0][0]!r}" if binary and len(files) > 1 else ""
    raise ValueError(
        f"{name} is not text: {non_text / sampled:.1%} of the {sampled:,} bytes sampled (the first "
        f"{SAMPLE_BYTES:,} bytes of {files_read} file(s)) are control bytes or invalid UTF-8, more "
        f"than the {MAX_NON_TEXT:.0%} allowed{example}; give a text file, a directory of text "
        "files or a glob of them (e.g. data.path='corpus/**/*.txt')")
  return tuple(binary)


def _regular(files: list[Path], name: str) -> None:
  """Raises ValueError for a path that is not a regular file (a device or pipe, which the text
  check read a prefix of): training reads each file whole, twice for a pipe."""
  special = [f for f in files if not f.is_file()]
  if special:
    raise ValueError(f"{name}: {str(special[0])!r} is not a regular file (a device or pipe); "
                     "save the text to a file and give that")


def load_corpus(config: DataConfig, min_tokens: int, option: str = "data.path") -> Corpus:
  """Reads and splits the corpus. Raises ValueError naming data.path (or `option`, for a caller
  whose user gave the path under another name) when it matches no file, is not text
  (check_text: before any file is read whole), is a device or pipe, or has too few tokens for
  min_tokens. Files that look binary in a corpus that is text overall are kept and listed in
  Corpus.binary_files."""
  source = config.path if config.path is not None else f"Python stdlib at {stdlib_root()}"
  files = list_files(config.path)
  name = f"{option}={config.path!r}"
  if not files:
    raise ValueError(f"{name} matches no files")
  binary = check_text(files, name) if config.path is not None else ()  # before reading any whole
  _regular(files, name)
  contents = [(f, f.read_bytes()) for f in files]
  contents = [(f, data) for f, data in contents if data]
  if not contents:
    raise ValueError(f"{name} matches only empty files ({len(files)})")
  if len(contents) == 1:  # one file: hold out its tail
    data = contents[0][1]
    cut = int(len(data) * (1 - config.val_fraction))
    train, val = [data[:cut]], [data[cut:]]
  else:
    base = stdlib_root() if config.path is None else Path(config.path).expanduser()
    train, val = [], []
    for f, data in contents:
      try:
        relative = str(f.relative_to(base if base.is_dir() else base.parent))
      except ValueError:
        relative = str(f)
      (val if _is_validation(relative, config.val_fraction) else train).append(data)
    if not val:  # a handful of files can all hash to train; hold out the last one
      val.append(train.pop())
  corpus = Corpus(train=_tokens(train), val=_tokens(val), num_files=len(contents), source=source,
                  binary_files=binary)
  for split in ("train", "val"):
    if len(getattr(corpus, split)) < min_tokens:
      raise ValueError(f"{name}: the {split} split has {len(getattr(corpus, split))} tokens, "
                       f"fewer than {'train.seq_len' if option == 'data.path' else 'the window'}"
                       f" + 1 = {min_tokens}")
  return corpus


def batch_at(tokens: np.ndarray, seed: int, stream: int, index: int, batch_size: int,
             seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Random windows: (inputs [B,T], targets [B,T]) int32, a pure function of its arguments.

  stream separates the training batches (0) from the fixed validation batches (1).
  """
  rng = np.random.default_rng([seed, stream, index])
  starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)  # window of T+1 fits
  windows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)  # [B,T+1]
  return windows[:, :-1], windows[:, 1:]


def unigram_entropy(tokens: np.ndarray) -> float:
  """Entropy in nats of the token frequency distribution: what a model with no context gets."""
  counts = np.bincount(tokens.astype(np.int64))
  p = counts[counts > 0] / len(tokens)
  return float(-(p * np.log(p)).sum())
