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
  a workdir that cannot be created or written, a data.path that names nothing on disk, a
  train.init_from that is not a workdir of this model (check_init_from)."""
  if config.model.vocab_size < ByteTokenizer.vocab_size:
    raise ValueError(f"model.vocab_size={config.model.vocab_size} is invalid: the byte tokenizer "
                     f"needs at least {ByteTokenizer.vocab_size}")
  if config.workdir is not None:
    check_writable_directory(config.workdir, "workdir")
  _check_data_path(config.data.path)
  check_init_from(config)


def check_init_from(config: Config) -> None:
  """train.init_from must be a workdir (config.yaml) of the same model, trained on bytes as
  `mla-jax train` trains: a model with its own tokenizer (converted from Hugging Face) would read
  the byte-level corpus as the wrong tokens. Raises ValueError naming the differing fields."""
  from mla_jax import workdir as layout
  from mla_jax.config.run import _EXECUTION_MODEL_FIELDS as _EXECUTION_FIELDS, differing_fields

  source = config.train.init_from
  if source is None:
    return
  start = layout.read_workdir_config(source).model  # names a path that is not a workdir
  differences = differing_fields(
      {k: v for k, v in start.to_dict().items() if k not in _EXECUTION_FIELDS},
      {k: v for k, v in config.model.to_dict().items() if k not in _EXECUTION_FIELDS})
  if differences:
    raise ValueError(f"train.init_from={source!r} holds another model than this config's; "
                     f"differing fields: {'; '.join('model.' + d for d in differences)}. Give "
                     "no CONFIG with --init-from to train the workdir's own model")
  if layout.special_tokens_path(source).is_file() or layout.tokenizer_path(source).is_file():
    raise ValueError(f"train.init_from={source!r} is a model with its own tokenizer, and `mla-jax "
                     "train` reads byte-level text: fine-tuning it here is not supported")


def _check_data_path(path: str | None) -> None:
  if path is None or glob.has_magic(path):  # the default corpus, or a glob: matched when loaded
    return
  if not Path(path).expanduser().exists():
    raise ValueError(f"data.path={path!r} does not exist; give a text file, a directory of text "
                     "files or a glob, or data.path=null for the Python standard library")
