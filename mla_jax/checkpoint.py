"""Checkpoints in WORKDIR/checkpoints through orbax's CheckpointManager.

Each checkpoint holds the train state (params, optimizer state, step), or the parameters alone
(`mla-jax convert`), and JSON metadata (the model config, the data position). Orbax writes into a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

CHECKPOINTS_DIR = "checkpoints"  # a workdir's orbax directory (mla_jax/workdir.py: the layout)


def _orbax():
  """orbax.checkpoint, imported on first use: a workdir's layout and config are read without it."""
  import orbax.checkpoint as ocp

  return ocp


def check_writable_directory(path: str | Path, name: str) -> None:
  """Refuses (ValueError naming `name`, e.g. 'workdir' or '--out') a directory path that cannot be
  created or written: an existing file, a file among its parents, or a parent without write
  permission. Called before any expensive work, so a run never fails at its first save."""
  path = Path(path).expanduser()
  if path.exists() and not path.is_dir():
    raise ValueError(f"{name}={str(path)!r} is a file; give a directory path (new or existing)")
  parent = path
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    raise ValueError(f"{name}={str(path)!r} cannot be created: {str(parent)!r} is a file, not a "
                     "directory")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"{name}={str(path)!r} cannot be written: no write permission in "
                     f"{str(parent)!r}; choose another directory")
  _probe_write(path, parent, name)


def _probe_write(path: Path, parent: Path, name: str) -> None:
  """Creates and removes an empty directory in `parent`: permission bits do not tell (root
  passes os.access everywhere), a read-only or special file system only says no when written.
  Raises ValueError naming `name` and the file system's reason."""
  import tempfile

  try:
    os.rmdir(tempfile.mkdtemp(prefix=".mla-jax-write-check-", dir=parent))
  except OSError as err:
    raise ValueError(f"{name}={str(path)!r} cannot be written: creating a directory in "
                     f"{str(parent)!r} failed ({err.strerror}); choose another directory") from None


class CheckpointError(ValueError):
  """A checkpoint on disk that cannot be read (damaged or incomplete files)."""


@contextlib.contextmanager
def _reading(directory: Path, step: int) -> Iterator[None]:
  """Turns whatever orbax/tensorstore raise on a damaged checkpoint (JSON, manifest or array
  errors) into one CheckpointError that names the checkpoint and says what to do."""
  _quiet_closed_loop_callbacks()
  try:
    yield
  except Exception as err:  # noqa: BLE001 -- any failure to read is the same news to the user
    step_dir = directory / str(step)
    damaged = _damaged_json_file(step_dir)
    first_line = (str(err).strip().splitlines() or [""])[0]
    files = re.findall(r'local file "([^"]+)"', first_line)  # tensorstore names what it read
    if damaged is not None:
      detail = f"{damaged} is not valid JSON"
    elif files:
      cause = first_line.split(f'local file "{files[-1]}": ', 1)[-1].split(" [tensorstore_spec")[0]
      detail = f"{files[-1]}: {cause if len(cause) <= 200 else cause[:200] + ' ...'}"
    else:
      first_line = first_line.split(" See full TensorStore details")[0]
      detail = f"{type(err).__name__}: " + (
          first_line if len(first_line) <= 200 else first_line[:200] + " ...")
    raise CheckpointError(
        f"checkpoint {step_dir} cannot be read ({detail}): it is damaged or incomplete; delete "
        "that directory to fall back to an earlier checkpoint, or write it again (train or "
        "convert)") from None


def _abandoned_read(unraisable) -> bool:
  """An unraisable report of a read left behind by a failed restore (see below)."""
  value, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
  if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
    return True
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _quiet_closed_loop_callbacks() -> None:
  """Silences one kind of traceback (idempotent): when a damaged checkpoint makes orbax's
  restore fail, orbax closes its event loop while tensorstore's other reads are in flight, and
  each one that finishes later reports "RuntimeError: Event loop is closed" from its own thread
  (through sys.unraisablehook), and orbax's abandoned read coroutines report their own errors
  when collected: dozens of tracebacks around the CheckpointError that explains the failure.
  Every other unraisable exception is reported as before."""
  if getattr(sys.unraisablehook, "quiets_closed_loop", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    if not _abandoned_read(unraisable):
      previous(unraisable)

  hook.quiets_closed_loop = True
  sys.unraisablehook = hook


def _damaged_json_file(step_dir: Path) -> Optional[Path]:
  """The first of a checkpoint's JSON metadata files (orbax's layout) that does not parse."""
  candidates = [step_dir / "_CHECKPOINT_METADATA", *sorted(step_dir.glob("*/_METADATA")),
                *sorted(step_dir.glob("*/metadata")), *sorted(step_dir.glob("*/array_metadatas/*"))]
  for path in candidates:
    try:
      json.loads(path.read_bytes())
    except (OSError, ValueError):
      return path
  return None


class Checkpoints:
  def __init__(self, workdir: str | Path, keep: int):
    ocp = _orbax()
    self.directory = Path(workdir).resolve() / CHECKPOINTS_DIR
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any], wait: bool = False) -> None:
    """Saves asynchronously (wait=True blocks until it is on disk); refuses non-finite params."""
    import jax
    import jax.numpy as jnp

    ocp = _orbax()
    finite = jax.tree_util.tree_reduce(
        lambda ok, x: ok & jnp.all(jnp.isfinite(x)), state.params, jnp.bool_(True))
    if not bool(finite):
      raise RuntimeError(f"refusing to save step {step}: parameters are not finite")
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    if wait:
      self._manager.wait_until_finished()

  def save_params(self, step: int, params: Any, meta: dict[str, Any]) -> None:
    """Parameters alone (a converted model: no optimizer state), marked so in the metadata."""
    ocp = _orbax()
    self._manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave({**meta, "params_only": True})))
    self._manager.wait_until_finished()

  def restore_params(self, step: int, target: Any) -> Any:
    """The parameters of a save_params checkpoint, into target's shapes and shardings."""
    ocp = _orbax()
    with _reading(self.directory, step):
      return self._manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(_abstract(target))))["params"]

  def restore_state_params(self, step: int, target: Any) -> Any:
    """The parameters alone of a save (train state) checkpoint, into target's shapes and
    shardings: orbax restores the "state" item's params subtree only (partial restore), so the
    optimizer state is neither read nor needs a target."""
    ocp = _orbax()
    item = {"params": _abstract(target)}
    with _reading(self.directory, step):
      return self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True)))["state"]["params"]

  def read_meta(self, step: int) -> dict[str, Any]:
    ocp = _orbax()
    with _reading(self.directory, step):
      return self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, target: Any) -> Any:
    """Restores the state into target's structure, shapes, dtypes and shardings. A checkpoint
    that cannot be read raises CheckpointError (a ValueError) naming it."""
    ocp = _orbax()
    with _reading(self.directory, step):
      return self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(target))))["state"]

  def wait(self) -> None:
    """Blocks until every asynchronous save is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _abstract(target: Any) -> Any:
  import jax

  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      target)
