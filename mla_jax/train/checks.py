"""What `mla-jax train` checks before it imports JAX, reads data or compiles: the config's
constraints that no dataclass can see alone (the tokenizer's vocabulary, a workdir that can be
written, a data path that exists). Light: NumPy-free, JAX-free, so a mistake costs no more than
`mla-jax info` does."""

from __future__ import annotations

import glob
from pathlib import Path

from mla_jax.checkpoint import check_writable_directory
from mla_jax.config.run import Config
from mla_jax.tokenizers import ByteTokenizer


def check_inputs(config: Config) -> None:
  """Raises ValueError naming the field: model.vocab_size below the byte tokenizer's ids,
  a workdir that cannot be created or written, a data.path that names nothing on disk."""
  if config.model.vocab_size < ByteTokenizer.vocab_size:
    raise ValueError(f"model.vocab_size={config.model.vocab_size} is invalid: the byte tokenizer "
                     f"needs at least {ByteTokenizer.vocab_size}")
  if config.workdir is not None:
    check_writable_directory(config.workdir, "workdir")
  _check_data_path(config.data.path)


def _check_data_path(path: str | None) -> None:
  if path is None or glob.has_magic(path):  # the default corpus, or a glob: matched when loaded
    return
  if not Path(path).expanduser().exists():
    raise ValueError(f"data.path={path!r} does not exist; give a text file, a directory of text "
                     "files or a glob, or data.path=null for the Python standard library")
