"""Training text: the corpus on disk, and batches as a pure function of step.

The default corpus is the running Python's standard library sources: real text, on every machine,
no download. Files are split into train and validation by a hash of their relative path, so the
split does not depend on file order or count. A batch is a function of (seed, step) alone, so a
resumed run sees exactly the batches an unbroken one would. Written by hand rather than with
grain: sampling random windows from one in-memory array is a few lines and needs no workers.
"""

from __future__ import annotations

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


def stdlib_root() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def list_files(path: Optional[str]) -> list[Path]:
  """The files of a data path (file, directory or glob), sorted; the stdlib's *.py for None."""
  if path is None:
    root = stdlib_root()
    return sorted(p for p in root.rglob("*.py")
                  if "site-packages" not in p.relative_to(root).parts and p.is_file())
  target = Path(path).expanduser()
  if target.is_file():
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


def _tokens(chunks: list[bytes]) -> np.ndarray:
  if not chunks:
    return np.zeros((0,), np.uint16)
  pieces = []
  for chunk in chunks:
    pieces.append(np.frombuffer(chunk, np.uint8).astype(np.uint16))
    pieces.append(np.array([ByteTokenizer.EOS], np.uint16))
  return np.concatenate(pieces)


def load_corpus(config: DataConfig, min_tokens: int) -> Corpus:
  """Reads and splits the corpus; errors name data.path when it is unusable for min_tokens."""
  source = config.path if config.path is not None else f"Python stdlib at {stdlib_root()}"
  files = list_files(config.path)
  if not files:
    raise ValueError(f"data.path={config.path!r} matches no files")
  contents = [(f, f.read_bytes()) for f in files]
  contents = [(f, data) for f, data in contents if data]
  if not contents:
    raise ValueError(f"data.path={config.path!r} matches only empty files ({len(files)})")
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
  corpus = Corpus(train=_tokens(train), val=_tokens(val), num_files=len(contents), source=source)
  for split in ("train", "val"):
    if len(getattr(corpus, split)) < min_tokens:
      raise ValueError(f"data.path={config.path!r}: the {split} split has "
                       f"{len(getattr(corpus, split))} tokens, fewer than train.seq_len + 1 = "
                       f"{min_tokens}")
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
