"""`mla-jax bench decode --block-sizes`: the MLA flash step timed per block size, and the tuner.

A block is how many cached tokens one step of the decode loop reads: model.decode_block_size for
XLA's flash-decoding loop, model.decode_kernel_block_size for the Pallas kernel. The best value
depends on the backend (a CPU core's caches, a TPU core's VMEM and DMA overheads, a GPU SM's
shared memory and registers), so it is measured, not copied: `--block-sizes tune` times this
backend's candidates below at the longest context and names the fastest, with the config field
that sets it. The candidates only bound the search: each list spans the sizes the backend's
constraints allow (the GPU kernel: powers of 2 >= 16; the TPU kernel: multiples of 8 rows) from
small blocks (loop overhead dominates) to large ones (no longer fit the fast memory).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from mla_jax.bench.common import Ceilings, Table, parse_ints, progress
from mla_jax.config.model import ModelConfig
from mla_jax.kernels.mla_decode import default_block_size, target_platform, uses_pallas
from mla_jax.layers.flash_decode import DEFAULT_BLOCK_SIZE
from mla_jax.model import Transformer

# (platform, path) -> candidate block sizes for `tune`; on CPU the kernel runs interpreted.
TUNE_CANDIDATES = {
    ("cpu", "xla"): (64, 128, 256, 512, 1024),
    ("cpu", "pallas"): (8, 16, 32, 64),
    ("tpu", "xla"): (256, 512, 1024, 2048),
    ("tpu", "pallas"): (128, 256, 512, 1024, 2048),
    ("gpu", "xla"): (256, 512, 1024, 2048),
    ("gpu", "pallas"): (16, 32, 64, 128, 256),
}
QUICK_CANDIDATES = (16, 32)  # --quick: powers of 2 >= 16 fit every path


def parse_block_sizes(text: str, kernel: bool, longest: int, quick: bool) -> list[int]:
  """--block-sizes: 'none' -> []; 'tune' -> this backend's candidates for the path (the kernel
  when `kernel`), those up to the longest context (at least the smallest); else the listed
  sizes, sorted. Raises ValueError for a list that is not positive integers."""
  text = str(text).strip().lower()
  if text == "none":
    return []
  if text != "tune":
    return sorted(set(parse_ints(text, "--block-sizes")))
  candidates = QUICK_CANDIDATES if quick else TUNE_CANDIDATES[
      (target_platform(), "pallas" if kernel else "xla")]
  return [n for n in candidates if n <= longest] or [candidates[0]]


def block_field(config: ModelConfig) -> str:
  """The config field a block size sets for this config's decode path."""
  return "decode_kernel_block_size" if uses_pallas(config.decode_kernel) else "decode_block_size"


def block_rows(base: ModelConfig, batch: int, context: int, block_sizes: list[int],
               repeats: int, ceilings: Ceilings, measure: Callable[..., dict]) -> list[dict]:
  """The MLA flash step at `context` for each block size (measure: decode.measure_step)."""
  field = block_field(base)
  rows, params = [], None
  for block in block_sizes:
    config = dataclasses.replace(base, **{field: block})
    if params is None:
      params = Transformer(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    progress(f"MLA flash, {field} {block:,}, context {context:,}")
    rows.append({"block": block, "field": field,
                 **measure(config, params, batch, context, "flash", repeats, ceilings)})
  return rows


def block_table(rows: list[dict]) -> Table:
  """The sweep, with the fastest block size named as the pick for this backend and path."""
  best = min(rows, key=lambda r: r["step_ms"])
  for row in rows:
    row["picked"] = row is best
  field, kernel, platform = best["field"], best["kernel"], target_platform()
  default = (default_block_size() if kernel == "pallas" else DEFAULT_BLOCK_SIZE)
  notes = [f"Tuned for {platform} ({kernel} path): {field}={best['block']:,}, the fastest here "
           f"({best['step_ms']:,.2f} ms); the library's default is {default:,}."]
  if kernel == "pallas" and platform == "cpu":
    notes.append("The kernel ran in interpret mode on CPU: these times are the simulator's, not "
                 "a speed measurement, and the pick says nothing about a TPU or GPU.")
  columns = (("block", field), ("kernel", "kernel"), ("context", "context"), ("batch", "batch"),
             ("step_ms", "step ms (median)"), ("min_ms", "min"), ("max_ms", "max"),
             ("roofline_fraction", "of roofline"), ("compile_s", "compile s"),
             ("picked", "picked"))
  return Table("MLA flash step by block size", columns, rows, notes)
