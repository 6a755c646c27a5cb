"""`mla-jax bench quality`: validation loss of MLA, MHA, GQA and MQA at equal parameters.

The small-scale analogue of the DeepSeek-V2 paper's appendix D (MLA against MHA at equal
training): each attention trains the same model size (baselines' MLP width matched to MLA's
parameter count) with the library's own `train` on the same data, batches and token budget,
for several seeds, and the table gives each one's validation loss and perplexity next to its
KV-cache bytes per token. A difference smaller than the spread over seeds is noise, and the
table says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sysconfig
import tempfile
from pathlib import Path

from mla_jax.bench import add_quick_option
from mla_jax.bench.common import (Report, Table, count_params, display_path, header_lines,
                                  parse_ints, select_variants)
from mla_jax.bench.common import progress
from mla_jax.bench.memory import cache_per_token
from mla_jax.bench.train import ATTENTIONS, CONFIGS, add_variants_argument, variants
from mla_jax.config.loader import load_config
from mla_jax.config.run import Config, DataConfig
from mla_jax.train.loop import train

QUICK_DATA = str(Path(sysconfig.get_paths()["stdlib"]) / "json" / "*.py")  # a few small files


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", default=display_path(CONFIGS / "tiny.yaml"),
                      help="the MLA model and training settings (default: %(default)s)")
  add_quick_option(parser, "--steps", full=600, quick=3, type=int,
                   help="training steps per run")
  add_quick_option(parser, "--seeds", full="0,1", quick="0",
                   help="comma-separated seeds, one run each per attention")
  add_quick_option(parser, "--data", full=None, quick=QUICK_DATA,
                   shown="the config's data.path, i.e. this Python's standard library",
                   help="the text to train and validate on (data.path)")
  add_variants_argument(parser)


def run_config(args: argparse.Namespace, model, seed: int, workdir: str) -> Config:
  base = load_config(args.config)
  tc = base.train
  if args.quick:
    tc = dataclasses.replace(tc, batch_size=8, seq_len=16, eval_batches=1)
    model = dataclasses.replace(model, num_layers=1) if model.num_layers != 1 else model
  warmup = None if tc.warmup_steps is None else min(tc.warmup_steps, args.steps - 1)  # None: a tenth
  tc = dataclasses.replace(tc, steps=args.steps, warmup_steps=warmup,
                           eval_every=args.steps, checkpoint_every=args.steps,
                           keep_checkpoints=1, log_every=args.steps)
  data = base.data if args.data is None else DataConfig(path=args.data,
                                                         val_fraction=base.data.val_fraction)
  return Config(model=model, train=tc, data=data, mesh=base.mesh, workdir=workdir, seed=seed)


def run(args: argparse.Namespace) -> Report:
  if args.steps < 1:
    raise ValueError(f"--steps {args.steps} is invalid: must be >= 1")
  seeds = parse_ints(args.seeds, "--seeds", minimum=0)
  model = load_config(args.config).model
  if args.quick:
    model = dataclasses.replace(model, num_layers=1)
  runs = variants(model, select_variants(ATTENTIONS, args.variants))
  rows = []
  with tempfile.TemporaryDirectory(prefix="mla-jax-bench-quality-") as tmp:
    for name, config in runs:
      losses = []
      for seed in seeds:
        run_cfg = run_config(args, config, seed, f"{tmp}/{name}-{seed}")
        progress(f"{name}, seed {seed}: training {args.steps:,} steps of "
                 f"{run_cfg.train.batch_size} x {run_cfg.train.seq_len} tokens")
        summary = train(run_cfg, log=lambda _: None, progress=False)
        if summary["interrupted"]:  # SIGTERM/Ctrl-C: train saved and returned; so do we
          raise KeyboardInterrupt(f"bench quality stopped by {summary['interrupted']}")
        losses.append(float(summary["val_loss"]))
      mean = statistics.fmean(losses)
      _, _, _, kv_bytes = cache_per_token(config)
      rows.append({"variant": name, "params": count_params(config), "kv_bytes_per_token": kv_bytes,
                   "val_losses": ", ".join(f"{x:.4f}" for x in losses), "val_loss": mean,
                   "spread": max(losses) - min(losses), "perplexity": math.exp(mean),
                   "seeds": len(seeds)})
  tc = run_cfg.train
  mla = next((r for r in rows if r["variant"] == "MLA"), None)
  for row in rows:
    if mla is None:
      row["vs_mla"], row["verdict"] = None, "-"
      continue
    row["vs_mla"] = row["val_loss"] - mla["val_loss"]
    noise = max(row["spread"], mla["spread"])
    if row is mla:
      row["verdict"] = "(reference)"
    elif len(seeds) < 2:
      row["verdict"] = "one seed: noise unknown"
    elif abs(row["vs_mla"]) <= noise:
      row["verdict"] = "within noise"
    else:
      row["verdict"] = "MLA better" if row["vs_mla"] > 0 else "MLA worse"
  tokens = tc.steps * tc.batch_size * tc.seq_len
  notes = [
      f"Each run: {tc.steps:,} steps of {tc.batch_size} x {tc.seq_len} tokens = {tokens:,} "
      f"training tokens, the same batches for every attention (a function of seed and step); "
      f"validation loss in nats/token over {tc.eval_batches} fixed batches; data: "
      f"{run_cfg.data.path or 'this Python standard library'}.",
      "spread = max - min over seeds; 'within noise' when the difference from MLA is no larger "
      "than the larger spread. The paper's appendix D compares far larger models and token "
      "budgets; at this scale the figures say which way the cache saving costs or gains "
      "quality only as far as the spread allows.",
  ]
  columns = (("variant", "attention"), ("params", "parameters"),
             ("kv_bytes_per_token", "KV bytes/token"), ("val_losses", "val loss per seed"),
             ("val_loss", "mean val loss"), ("spread", "spread"), ("perplexity", "perplexity"),
             ("vs_mla", "minus MLA"), ("verdict", "verdict"))
  table = Table(f"Validation loss at equal parameters ({len(seeds)} seed(s))", columns, rows,
                notes, formats={"val_loss": "{:.4f}", "spread": "{:.4f}",
                                "perplexity": "{:.3f}", "vs_mla": "{:+.4f}"})
  dtype = f"{model.dtype} (parameters {model.param_dtype})"
  return Report("quality", header_lines(dtype, args.command), [table],
                plot=lambda png: plot(rows, png))


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for row in rows:
    ax.errorbar(row["kv_bytes_per_token"], row["val_loss"], yerr=row["spread"] / 2, fmt="o",
                capsize=4, color="tab:red" if row["variant"] == "MLA" else "tab:gray")
    ax.annotate(row["variant"], (row["kv_bytes_per_token"], row["val_loss"]),
                textcoords="offset points", xytext=(6, 4), fontsize=9)
  ax.set_xscale("log")
  ax.set_xlabel("KV-cache bytes per token, all layers (log)")
  ax.set_ylabel("validation loss (nats/token; bar: spread over seeds)")
  ax.grid(alpha=0.3, which="both")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
