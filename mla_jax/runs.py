"""A run directory loaded for use: its config, latest parameters, tokenizer and EOS id.

Built on mla_jax/workdir.py (the layout, config.yaml, the checkpoint) and mla_jax/tokenizers.py
(tokenizer.json or the byte tokenizer); `mla-jax generate` loads through load_run too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

from mla_jax import tokenizers
from mla_jax.config.run import Config
from mla_jax.workdir import load_checkpoint, read_workdir_config

if TYPE_CHECKING:
  from mla_jax.model import Transformer


class Run(NamedTuple):
  """A workdir loaded for generation (load_run)."""

  config: Config  # the run's config.yaml; config.model is the model
  params: Any  # the latest checkpoint's parameters, on one device
  tokenizer: Any  # encode/decode/EOS/PAD; None for a converted model without tokenizer.json
  step: int  # the checkpoint's step (0 for a converted model)
  eos_id: Optional[int]  # the id that ends a sequence (tokenizer's EOS, else the model's), or None

  @property
  def model(self) -> "Transformer":
    """The Transformer of config.model, for mla_jax.generate and mla_jax.stream."""
    from mla_jax.model import Transformer

    return Transformer(self.config.model)


def load_run(workdir: str | Path) -> Run:
  """The latest checkpoint of a workdir written by `mla-jax train` or `mla-jax convert`, with its
  config, tokenizer and EOS id: `run = load_run(w); mla_jax.generate(run.model, run.params,
  [run.tokenizer.encode("def ")], max_new_tokens=20, eos_id=run.eos_id)`.

  The tokenizer is the workdir's tokenizer.json, else the byte tokenizer `mla-jax train` uses;
  None where the model has neither (converted without tokenizer.json): prompt with token ids.
  Raises ValueError (one line, naming the workdir) for a path that is not a workdir, a workdir
  without a complete checkpoint, a checkpoint of another model than its config.yaml, or an
  unreadable checkpoint or tokenizer.json (load_checkpoint, tokenizers.optional_tokenizer)."""
  vocab_size = read_workdir_config(workdir).model.vocab_size  # refuses a non-workdir first
  tokenizer = tokenizers.optional_tokenizer(workdir, vocab_size)
  eos = tokenizers.eos_id(workdir, tokenizer)
  config, params, step = load_checkpoint(workdir)
  return Run(config=config, params=params, tokenizer=tokenizer, step=step, eos_id=eos)
