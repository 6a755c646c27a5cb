"""Training metrics: WORKDIR/metrics.jsonl, TensorBoard event files, and WORKDIR/loss.png."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mla_jax import workdir as layout


def _clean(value: Any) -> Any:
  """JSON has no NaN: a non-finite number is written as null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


class MetricsLog:
  """Appends one JSON object per logged step; mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str | Path, resume_step: int):
    from tensorboardX import SummaryWriter

    self.path = layout.metrics_path(workdir)
    self._drop_after(resume_step)
    self._tensorboard = SummaryWriter(str(layout.tensorboard_dir(workdir)))

  def _drop_after(self, step: int) -> None:
    """A resumed run redoes the steps after its checkpoint: forget what a killed run logged."""
    if not self.path.exists():
      return
    kept = [line for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    self.path.write_text("".join(line + "\n" for line in kept))

  def write(self, record: dict[str, Any]) -> None:
    record = {k: _clean(v) for k, v in record.items()}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self._tensorboard.add_scalar(key, value, record["step"])

  def close(self) -> None:
    self._tensorboard.close()


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
  path = layout.metrics_path(workdir)
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(workdir: str | Path) -> Path:
  """Train and validation loss against step, from metrics.jsonl."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = read_metrics(workdir)
  train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
  val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
  fig, ax = plt.subplots(figsize=(7, 4))
  if train:
    ax.plot(*zip(*train), label="train loss", linewidth=1)
  if val:
    ax.plot(*zip(*val), "o-", label="validation loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats / token)")
  ax.grid(alpha=0.3)
  ax.legend()
  out = layout.loss_plot_path(workdir)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out
