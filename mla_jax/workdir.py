"""A run directory (workdir): its layout, its config, and its parameters.

`mla-jax train` and `mla-jax convert` write a workdir; `mla-jax generate` reads one. Its files:

  config.yaml          the run's Config (train, convert)
  checkpoints/<step>/  orbax checkpoints: a train state (train) or parameters alone (convert),
                       with JSON metadata (mla_jax/checkpoint.py)
  metrics.jsonl        one record per logged step (train)
  tensorboard/         the same scalars as TensorBoard event files (train)
  loss.png             train and validation loss against step (train)
  tokenizer.json       the model's Hugging Face tokenizer (convert, when the source has one)
  special_tokens.json  the EOS id; marks a converted workdir (convert)

load_run (exported as mla_jax.load_run) is what `mla-jax generate` uses: the config, parameters,
tokenizer and step of a workdir, ready for mla_jax.generate. load_checkpoint restores the
parameters alone, against jax.eval_shape of the model's init: no
optimizer is built and no training module is imported, so generating from a workdir costs the
parameters' memory and nothing more (docs/checkpoints.md). JAX and orbax are imported only by
the functions that read arrays.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from mla_jax.checkpoint import CHECKPOINTS_DIR, Checkpoints
from mla_jax.config.loader import config_from_dict, read_yaml
from mla_jax.config.run import Config, differing_fields

if TYPE_CHECKING:
  from mla_jax.config.model import ModelConfig
  from mla_jax.model import Transformer

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOSS_PLOT = "loss.png"
TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS_FILE = "special_tokens.json"


def config_path(workdir: str | Path) -> Path:
  return Path(workdir) / CONFIG_FILE


def checkpoints_dir(workdir: str | Path) -> Path:
  return Path(workdir) / CHECKPOINTS_DIR


def metrics_path(workdir: str | Path) -> Path:
  return Path(workdir) / METRICS_FILE


def tensorboard_dir(workdir: str | Path) -> Path:
  return Path(workdir) / TENSORBOARD_DIR


def loss_plot_path(workdir: str | Path) -> Path:
  return Path(workdir) / LOSS_PLOT


def tokenizer_path(workdir: str | Path) -> Path:
  return Path(workdir) / TOKENIZER_FILE


def special_tokens_path(workdir: str | Path) -> Path:
  return Path(workdir) / SPECIAL_TOKENS_FILE


def write_config(workdir: str | Path, config: Config) -> Path:
  """Writes config.yaml atomically (a temporary file renamed over it): a reader never sees half
  a file, and a run killed while writing keeps the previous one."""
  import os

  import yaml

  path = config_path(workdir)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
  os.replace(tmp, path)
  return path


def write_params_workdir(workdir: str | Path, config: Config, params: Any, meta: dict[str, Any],
                         tokenizer: Optional[Path] = None, eos_token_id: Optional[int] = None,
                         special_tokens: bool = True) -> Path:
  """Writes a workdir holding parameters alone (no optimizer state; `mla-jax generate` runs it,
  `mla-jax train --init-from` starts from it): an orbax checkpoint at step 0 with `meta`,
  config.yaml, a copy of `tokenizer` (a tokenizer.json) when given, and with special_tokens
  special_tokens.json (the EOS id; it marks a model whose text needs that tokenizer, so the
  byte tokenizer is never used in its place). The caller has checked the directory."""
  import shutil

  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoints = Checkpoints(workdir, keep=1)
  try:
    checkpoints.save_params(0, params, {"model": config.model.to_dict(), **meta})
  finally:
    checkpoints.close()
  write_config(workdir, config)
  if tokenizer is not None:
    shutil.copy(tokenizer, tokenizer_path(workdir))
  if special_tokens:
    special_tokens_path(workdir).write_text(json.dumps(
        {"eos_token_id": eos_token_id, "tokenizer": TOKENIZER_FILE if tokenizer else None}))
  return workdir


def read_workdir_config(workdir: str | Path) -> Config:
  """The Config in a workdir's config.yaml; ValueError when the path is not a workdir."""
  path = config_path(workdir)
  if Path(workdir).is_file():
    raise ValueError(f"workdir {str(workdir)!r} is a file; expected a workdir directory "
                     "(from `mla-jax train` or `mla-jax convert`)")
  if not path.is_file():
    raise ValueError(f"workdir {str(workdir)!r} is not a training workdir: no config.yaml")
  return config_from_dict(read_yaml(path))


def _saved_run(meta: dict[str, Any]) -> dict[str, Any]:
  """The run fields a checkpoint was saved with (only the model for checkpoints from before
  run fields were stored)."""
  return meta.get("run") or {"model": meta["model"]}


def _same_keys(current: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
  return {k: current[k] for k in saved if k in current}


def check_workdir(config: Config, checkpoints: Optional[Checkpoints] = None) -> Optional[int]:
  """The step to resume from (None: a fresh run). Refuses, naming the differing fields, a
  workdir whose checkpoint belongs to another run, and a workdir written by `mla-jax convert`.
  Opens no checkpoint manager on a fresh workdir (so a refused command leaves no trace)."""
  owned = checkpoints is None
  if owned:
    if not checkpoints_dir(config.workdir).is_dir():
      return None
    checkpoints = Checkpoints(config.workdir, config.train.keep_checkpoints)
  try:
    step = checkpoints.latest_step()
    if step is None:
      return None
    meta = checkpoints.read_meta(step)
  finally:
    if owned:
      checkpoints.close()
  workdir = config.workdir
  if meta.get("params_only"):
    raise ValueError(
        f"workdir {workdir!r} holds a model converted by `mla-jax convert` (parameters only, "
        "with its own tokenizer), and training one is not supported (`mla-jax train` reads byte-"
        f"level text); run it with `mla-jax generate --checkpoint {workdir}`, or train a new "
        "model with another workdir=")
  current = json.loads(json.dumps(config.run_fields()))  # tuples as lists, as stored
  saved = _saved_run(meta)
  differences = differing_fields(saved, _same_keys(current, saved))
  if differences:
    trained_for = saved.get("train", {}).get("steps")
    of = f" of train.steps={trained_for}" if trained_for is not None else ""
    fresh = f"{workdir.rstrip('/')}-{config.run_id()}"
    raise ValueError(
        f"workdir {workdir!r} holds another run (checkpoint at step {step}{of}); differing "
        f"fields: {'; '.join(differences)}. A checkpoint continues only the run that made it: "
        f"add workdir={fresh} for a fresh run, or drop the overrides that differ")
  return step


def abstract_params(config: "ModelConfig", device: Any = None) -> Any:
  """The model's parameter tree as shapes and dtypes (jax.eval_shape of its init: nothing is
  allocated), each placed on `device` (default: the first local device): a restore target."""
  import jax

  from mla_jax.model import parameter_shapes

  shapes = parameter_shapes(config)
  sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def load_checkpoint(workdir: str | Path, target: Any = None) -> tuple[Config, Any, int]:
  """(config, params, step) of the latest checkpoint in a `mla-jax train` or `mla-jax convert`
  workdir, the parameters on one device (or as `target`, a tree of jax.ShapeDtypeStruct with
  shardings, says: restored in place over a mesh); clear errors for a directory that is not one, or whose
  checkpoint is of another model than its config.yaml. A checkpoint that cannot be read raises
  CheckpointError (a ValueError) naming it."""
  config = read_workdir_config(workdir)
  if not checkpoints_dir(workdir).is_dir():
    raise ValueError(f"workdir {str(workdir)!r} has no checkpoints/ directory")
  checkpoints = Checkpoints(workdir, config.train.keep_checkpoints)
  try:
    step = checkpoints.latest_step()
    if step is None:
      raise ValueError(f"workdir {str(workdir)!r} holds no complete checkpoint")
    meta = checkpoints.read_meta(step)
    # A field added to ModelConfig after the checkpoint was written is absent from its record
    # and takes its default, which keeps the older behaviour: only the recorded fields compare.
    recorded = meta["model"]
    differences = differing_fields(recorded, _same_keys(config.model.to_dict(), recorded))
    if differences:
      raise ValueError(f"workdir {str(workdir)!r}: its checkpoint (step {step}) is of another "
                       f"model than its config.yaml; differing fields: "
                       f"{'; '.join('model.' + d for d in differences)}")
    target = abstract_params(config.model) if target is None else target
    if meta.get("params_only"):  # written by `mla-jax convert`
      params = checkpoints.restore_params(step, target)
    else:  # a train state: its params subtree alone
      params = checkpoints.restore_state_params(step, target)
  finally:
    checkpoints.close()
  return config, params, step


def load_trained(workdir: str | Path) -> tuple[Config, Any]:
  """(config, params) of load_checkpoint."""
  config, params, _ = load_checkpoint(workdir)
  return config, params
