"""`mla-jax bench compute`: the "computational overhead" of MLA, as FLOPs from XLA's cost analysis.

Each function is compiled from abstract shapes (jax.ShapeDtypeStruct: nothing is allocated or
run) and XLA's `cost_analysis()` of the compiled program gives its FLOPs and bytes accessed:
training (forward + backward of the library's loss), prefill (naive and, for MLA, absorbed),
and one decode step (`decode_step`, naive and absorbed), for MLA and for MHA with the same heads
and the same parameter count (MHA's MLP narrowed to match). A second table gives the arithmetic
intensity of the absorbed decode step against the machine's ridge point, over heads and
context, so the reader sees where it turns compute-bound.

XLA counts a loop body once: a decode path written as a loop over cache blocks would be
under-counted here, so the decode rows name their attn_impl (the plain einsum paths).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp

from mla_jax.bench import add_quick_option
from mla_jax.bench.common import (Report, Table, base_config, cost, count_params, default_dtype,
                                  header_lines, match_parameters, measure_ceilings, nbytes,
                                  parse_ints, quick_ceilings)
from mla_jax.bench.common import progress
from mla_jax.config.model import ModelConfig
from mla_jax.kinds import absorbed_weights, attention_kind, init_cache
from mla_jax.model import Transformer
from mla_jax.sampling import Sampler, decode_step
from mla_jax.train.step import compute_grads


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_quick_option(parser, "--context", full=4096, quick=32, type=int,
                   help="tokens per sequence for training and prefill, cached tokens for decode")
  parser.add_argument("--batch", type=int, default=1, help="sequences")
  parser.add_argument("--layers", type=int, default=1, help="decoder layers in the model")
  add_quick_option(parser, "--heads", full="16,32,128", quick="4,8",
                   help="head counts for the intensity table")
  add_quick_option(parser, "--contexts", full="512,4096,32768", quick="16,32",
                   help="contexts for the intensity table")
  parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                      help="model and cache dtype (default: float32 on CPU, bfloat16 otherwise)")


def resolve_defaults(args: argparse.Namespace) -> None:
  """Fills the default that depends on the backend (before the command is printed)."""
  args.dtype = args.dtype or default_dtype()


def _abstract(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


class Programs:
  """Compiles the library's functions for one config from shapes and reads their cost."""

  def __init__(self, config: ModelConfig, batch: int):
    self.config, self.batch = config, batch
    self.model = Transformer(config)
    self.params = jax.eval_shape(lambda: self.model.init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]

  def tokens(self, t: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((self.batch, t), jnp.int32)

  def cache(self, slots: int):
    return jax.eval_shape(lambda: init_cache(self.config, self.batch, slots))

  def train(self, t: int) -> dict:
    fn = jax.jit(lambda p, x, y: compute_grads(self.model, p, x, y))
    return cost(fn.lower(self.params, self.tokens(t), self.tokens(t)).compile())

  def prefill(self, t: int, attn_impl: str) -> dict:
    fn = jax.jit(lambda p, x, c: self.model.apply({"params": p}, x, cache=c, attn_impl=attn_impl))
    return cost(fn.lower(self.params, self.tokens(t), self.cache(t)).compile())

  def decode(self, slots: int, attn_impl: str) -> dict:
    token = jax.ShapeDtypeStruct((self.batch,), jnp.int32)
    absorbed = jax.eval_shape(functools.partial(absorbed_weights, self.config), self.params)
    return cost(decode_step.lower(self.params, token, self.cache(slots), jax.random.key(0),
                                  absorbed, model=self.model, sampler=Sampler(),
                                  attn_impl=attn_impl).compile())

  def step_bytes(self, slots: int) -> int:
    """Cache + weights: what one decode step must read at least."""
    return nbytes(self.cache(slots).layers) + nbytes(self.params)


def overhead_rows(mla: ModelConfig, mha: ModelConfig, batch: int, context: int) -> list[dict]:
  rows = []
  for name, config, functions in (
      ("MLA", mla, (("training (fwd + bwd)", "train", None), ("prefill", "prefill", "naive"),
                    ("prefill", "prefill", "absorbed"), ("decode step", "decode", "naive"),
                    ("decode step", "decode", "absorbed"))),
      ("MHA", mha, (("training (fwd + bwd)", "train", None), ("prefill", "prefill", "naive"),
                    ("decode step", "decode", "naive")))):
    programs = Programs(config, batch)
    for label, kind, impl in functions:
      progress(f"{name} {label}" + (f" ({impl} path)" if impl else "") + f", context {context:,}")
      if kind == "train":
        analysis, tokens = programs.train(context), batch * context
      elif kind == "prefill":
        analysis, tokens = programs.prefill(context, impl), batch * context
      else:
        analysis, tokens = programs.decode(context, impl), batch
      flops = float(analysis.get("flops", 0.0))
      accessed = float(analysis.get("bytes accessed", 0.0))
      rows.append({"variant": name, "params": count_params(config), "function": label,
                   "path": impl if attention_kind(config).absorbs or impl is None else "-",
                   "tokens": tokens, "flops": flops, "flops_per_token": flops / tokens,
                   "xla_bytes_per_token": accessed / tokens,
                   "flops_per_xla_byte": flops / accessed if accessed else None})
  mha_by_function = {r["function"]: r["flops_per_token"] for r in rows if r["variant"] == "MHA"}
  for row in rows:
    row["vs_mha"] = row["flops_per_token"] / mha_by_function[row["function"]]
  return rows


def intensity_rows(base: ModelConfig, heads: list[int], contexts: list[int], batch: int,
                   ridge: float) -> list[dict]:
  rows = []
  for h in heads:
    progress(f"MLA absorbed decode step, {h} heads, contexts {', '.join(map(str, contexts))}")
    programs = Programs(dataclasses.replace(base, num_heads=h), batch)
    per_context = {s: float(programs.decode(s, "absorbed").get("flops", 0.0)) for s in contexts}
    lo, hi = min(contexts), max(contexts)
    cache_gap = nbytes(programs.cache(hi).layers) - nbytes(programs.cache(lo).layers)
    marginal = (per_context[hi] - per_context[lo]) / cache_gap if cache_gap else None
    for s in contexts:
      moved = programs.step_bytes(s)
      intensity = per_context[s] / moved
      rows.append({"heads": h, "context": s, "batch": batch, "flops_per_step": per_context[s],
                   "bytes_per_step": moved, "intensity": intensity,
                   "cache_intensity": marginal, "ridge": ridge,
                   "bound": "compute" if intensity > ridge else "memory"})
  return rows


def run(args: argparse.Namespace) -> Report:
  for name in ("context", "batch", "layers"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name} {getattr(args, name)} is invalid: must be >= 1")
  heads = parse_ints(args.heads, "--heads")
  contexts = parse_ints(args.contexts, "--contexts")
  base = base_config(args, max(contexts + [args.context]))
  mha = match_parameters(base, dataclasses.replace(base, attention="mha"))
  rows = overhead_rows(base, mha, args.batch, args.context)
  progress("measuring this machine's bandwidth and matmul ceilings")
  ceilings = (quick_ceilings(args.dtype) if args.quick
              else measure_ceilings(args.dtype))
  grid = intensity_rows(base, heads, contexts, args.batch, ceilings.ridge_flops_per_byte)

  def flops(variant, function, path):
    return next(r["flops_per_token"] for r in rows if r["variant"] == variant and
                r["function"] == function and r["path"] == path)

  decode_ratio = flops("MLA", "decode step", "naive") / flops("MLA", "decode step", "absorbed")
  prefill_ratio = flops("MLA", "prefill", "absorbed") / flops("MLA", "prefill", "naive")
  overhead = Table(
      f"FLOPs per token at {args.context:,} tokens of context, batch {args.batch}",
      (("variant", "attention"), ("params", "parameters"), ("function", "function"),
       ("path", "attn_impl"), ("flops_per_token", "FLOPs/token"), ("vs_mha", "x MHA"),
       ("xla_bytes_per_token", "XLA bytes accessed/token"),
       ("flops_per_xla_byte", "FLOPs / XLA byte")), rows,
      [f"MHA's MLP width is {mha.intermediate_size:,} (MLA's {base.intermediate_size:,}) so both "
       "have the same parameter count.",
       f"Absorption: a decode step re-expanding the cache (naive) costs {decode_ratio:,.1f}x the "
       f"FLOPs of the absorbed step at {args.context:,} cached tokens; a prefill on the absorbed "
       f"path would cost {prefill_ratio:,.2f}x the naive one, which is why training "
       "(attn_impl='auto' without a cache) and generate's prefill of a fresh cache run naive; "
       "with a cache, 'auto' takes the blocked absorbed path (flash), which reads only the "
       "filled slots."])
  intensity = Table(
      "Absorbed decode step: arithmetic intensity against the ridge point",
      (("heads", "heads"), ("context", "context"), ("batch", "batch"),
       ("flops_per_step", "FLOPs/step"), ("bytes_per_step", "bytes/step (cache + weights)"),
       ("intensity", "FLOPs/byte"), ("cache_intensity", "FLOPs per cached byte (marginal)"),
       ("ridge", "ridge point (FLOPs/byte)"), ("bound", "bound here")), grid,
      ["Marginal: extra FLOPs per extra cache byte between the shortest and longest context, "
       "about 4H/itemsize (scores over C + R, weighted sum over C). Above the ridge point a step "
       "is compute-bound on this machine: many heads and a batch large enough to amortise the "
       "weights."])
  header = header_lines(args.dtype, args.command) + ceilings.lines()
  return Report("compute", header, [overhead, intensity],
                plot=lambda png: plot(rows, grid, png))


def plot(rows: list[dict], grid: list[dict], path: Path) -> None:
  import matplotlib.pyplot as plt

  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  labels = [f"{r['variant']} {r['function']}" + (f" ({r['path']})" if r["path"] not in
                                                   (None, "-") else "") for r in rows]
  left.barh(range(len(rows)), [r["flops_per_token"] for r in rows],
            color=["tab:red" if r["variant"] == "MLA" else "tab:gray" for r in rows])
  left.set_yticks(range(len(rows)), labels, fontsize=8)
  left.invert_yaxis()
  left.set_xscale("log")
  left.set_xlabel("FLOPs per token (XLA cost analysis, log)")
  for h in dict.fromkeys(r["heads"] for r in grid):
    points = [(r["context"], r["intensity"]) for r in grid if r["heads"] == h]
    right.plot(*zip(*points), "o-", label=f"{h} heads")
  right.axhline(grid[0]["ridge"], color="k", linestyle="--", label="ridge point (this machine)")
  right.set_xscale("log")
  right.set_yscale("log")
  right.set_xlabel("cached context (tokens)")
  right.set_ylabel("FLOPs per byte, absorbed decode step")
  right.legend(fontsize=8)
  right.grid(alpha=0.3, which="both")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
