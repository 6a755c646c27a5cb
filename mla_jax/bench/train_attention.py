"""The attention tables of `mla-jax bench train`: the training step with the naive path against
flash attention as T grows, with the peak memory of each; and flash attention's block sizes.

Each point is the library's Trainer step (AdamW, state donated) with train.attn_impl set, its
program compiled ahead of time; the peak memory is XLA's memory analysis of that program
(arguments, outputs and temporaries per device), the figure the train command's pre-check
reads. A naive step that needs more than this machine's available memory is not run (the
pre-check would refuse it); the row says so and gives its size. The two paths' steps are timed
interleaved (common.time_interleaved); compile seconds (lowering and compiling ahead of time) are
apart from the timed steps.

The roofline of each T is the naive step's: XLA's cost analysis of that compiled program (FLOPs
and bytes accessed, every one counted: it has no loops) over the machine's ceilings measured in
the same run, and which ceiling binds. Both paths are judged against it ('of roofline' = roofline
time / median step). The flash program's own count is not used: XLA's cost analysis counts a
while loop's body once, and its key-block loops are while loops, so it would undercount.

Beside each training step, the prefill of the same T tokens into an empty latent cache (a
jitted forward, generate's prefill; logits of every position) is timed on both paths, its
roofline again the naive program's: the threshold FLASH_ATTENTION_MIN_TOKENS, from which 'auto'
runs flash attention in training and prefill, is read off these two ratios.

The block-size table times the flash step at one T for each (flash_block_q, flash_block_k)
listed: how the defaults (model.flash_block_q / flash_block_k) are chosen.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import numpy as np

from mla_jax.bench import add_quick_option
from mla_jax.bench.common import (Ceilings, Table, cost, measure_ceilings, parse_ints, progress,
                                  quick_ceilings, time_interleaved)
from mla_jax.config.model import ModelConfig
from mla_jax.config.run import Config, TrainConfig
from mla_jax.layers.masking import FLASH_ATTENTION_MIN_TOKENS
from mla_jax.device_memory import device_memory_available
from mla_jax.train.memory import step_memory
from mla_jax.train.step import Trainer

PATHS = ("naive", "flash_attention")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_quick_option(parser, "--attention-lengths", full="256,512,1024,2048,4096,8192",
                   quick="32,64", help="T of the naive-against-flash table ('none' skips it)")
  parser.add_argument("--attention-batch", type=int, default=1,
                      help="sequences per step in the attention tables (default: %(default)s)")
  add_quick_option(parser, "--attention-repeats", full=5, quick=1, type=int,
                   help="timed steps per point of the attention tables")
  add_quick_option(parser, "--block-sizes", full="128x128,256x256,512x256,256x512,512x512,"
                   "1024x512,1024x1024", quick="16x16,32x32", metavar="QxK,...",
                   help="flash_block_q x flash_block_k pairs to time at --block-size-len "
                        "('none' skips it)")
  add_quick_option(parser, "--block-size-len", full=4096, quick=64, type=int,
                   help="T of the block-size table")


def parse_block_sizes(text: str) -> list[tuple[int, int]]:
  """'256x256,512x256' -> [(256, 256), (512, 256)]; 'none' -> []."""
  if str(text).strip().lower() == "none":
    return []
  pairs = []
  for part in str(text).split(","):
    values = part.strip().lower().split("x")
    if len(values) != 2 or not all(v.strip().isdigit() and int(v) > 0 for v in values):
      raise ValueError(f"--block-sizes {text!r} is invalid: expected QxK pairs of positive "
                       "integers, e.g. 256x256,512x256, or 'none'")
    pairs.append((int(values[0]), int(values[1])))
  return pairs


def parse_lengths(text: str) -> list[int]:
  return [] if str(text).strip().lower() == "none" else sorted(set(parse_ints(
      text, "--attention-lengths")))


def _step(model: ModelConfig, batch: int, seq_len: int, attn_impl: str):
  """(the Trainer with its step compiled, the step's memory in bytes, compile seconds, XLA's
  cost analysis of the compiled step)."""
  import time

  config = Config(model=dataclasses.replace(model, max_seq_len=max(model.max_seq_len, seq_len)),
                  train=TrainConfig(batch_size=batch, seq_len=seq_len, steps=10**6,
                                    warmup_steps=10, attn_impl=attn_impl))
  trainer = Trainer.build(config, devices=jax.devices()[:1])
  start = time.perf_counter()
  compiled = trainer.compile_train_step()
  compile_s = time.perf_counter() - start
  return trainer, step_memory(compiled)["total"], compile_s, cost(compiled)


def _runner(trainer: Trainer, batch: int, seq_len: int, vocab: int):
  state = {"state": trainer.init_state()}
  tokens = np.random.default_rng(0).integers(0, vocab, (batch, seq_len + 1), dtype=np.int32)
  inputs, targets = trainer.put_batch(tokens[:, :-1], tokens[:, 1:])

  def call():
    state["state"], metrics = trainer.train_step(state["state"], inputs, targets)
    return metrics["loss"]
  return call


def _prefill_runner(trainer: Trainer, batch: int, seq_len: int, attn_impl: str):
  """(a call that prefills batch x seq_len random tokens into an empty latent cache on
  `attn_impl`, XLA's cost analysis of that compiled program)."""
  from mla_jax.kinds import init_cache

  model = trainer.model
  params = trainer.init_state().params
  tokens = np.random.default_rng(1).integers(0, model.config.vocab_size, (batch, seq_len),
                                             dtype=np.int32)  # [B,T]

  def prefill(params, tokens):
    cache = init_cache(model.config, batch, seq_len)
    return model.apply({"params": params}, tokens, cache=cache, attn_impl=attn_impl)  # [B,T,V]

  compiled = jax.jit(prefill).lower(params, tokens).compile()
  return (lambda: compiled(params, tokens)[0]), cost(compiled)


def paths_against_length(model: ModelConfig, lengths: list[int], batch: int,
                         repeats: int, ceilings: Ceilings) -> Table:
  """The naive and the flash training step at each T: median/min/max ms, compile seconds and
  peak memory of each, against the naive step's roofline (see the module docstring)."""
  limit, what = device_memory_available(jax.devices()[:1]) or (float("inf"), "unknown")
  rows = []
  for t in lengths:
    row = {"seq_len": t}
    calls = {}
    for path in PATHS:
      progress(f"{path} attention, training step of {batch} x {t:,} tokens")
      trainer, memory, compile_s, analysis = _step(model, batch, t, path)
      row[f"{path}_mib"] = memory / 2**20
      row[f"{path}_compile_s"] = compile_s
      if path == "naive":
        roofline_s, row["bound"] = ceilings.roofline_s(analysis.get("bytes accessed", 0.0),
                                                       analysis.get("flops", 0.0))
        row["roofline_ms"] = roofline_s * 1e3
      if memory > limit:
        row[f"{path}_ms"] = f"does not fit ({memory / 2**30:,.1f} GiB)"
        continue
      calls[path] = _runner(trainer, batch, t, model.vocab_size)
      progress(f"{path} attention, prefill of {batch} x {t:,} tokens")
      calls[f"prefill_{path}"], prefill_analysis = _prefill_runner(trainer, batch, t, path)
      if path == "naive":
        roofline_s, row["prefill_bound"] = ceilings.roofline_s(
            prefill_analysis.get("bytes accessed", 0.0), prefill_analysis.get("flops", 0.0))
        row["prefill_roofline_ms"] = roofline_s * 1e3
    for path, timing in time_interleaved(calls, repeats).items():
      roofline = row["prefill_roofline_ms" if path.startswith("prefill_") else "roofline_ms"]
      row.update({f"{path}_ms": timing.median_s * 1e3, f"{path}_min": timing.min_s * 1e3,
                  f"{path}_max": timing.max_s * 1e3,
                  f"{path}_of_roofline": roofline / (timing.median_s * 1e3)})
    if "naive" in calls and "flash_attention" in calls:
      row["time_ratio"] = row["flash_attention_ms"] / row["naive_ms"]
      row["prefill_ratio"] = row["prefill_flash_attention_ms"] / row["prefill_naive_ms"]
    row["memory_ratio"] = row["naive_mib"] / row["flash_attention_mib"]
    rows.append(row)
  columns = (("seq_len", "T"), ("naive_ms", "naive ms (median)"), ("naive_min", "min"),
             ("naive_max", "max"), ("naive_compile_s", "compile s"),
             ("naive_mib", "naive peak MiB"), ("flash_attention_ms", "flash ms (median)"),
             ("flash_attention_min", "min"), ("flash_attention_max", "max"),
             ("flash_attention_compile_s", "compile s"), ("flash_attention_mib", "flash peak MiB"),
             ("time_ratio", "flash / naive time"), ("memory_ratio", "naive / flash memory"),
             ("roofline_ms", "roofline ms"), ("bound", "bound"),
             ("naive_of_roofline", "naive of roofline"),
             ("flash_attention_of_roofline", "flash of roofline"),
             ("prefill_naive_ms", "prefill naive ms (median)"), ("prefill_naive_min", "min"),
             ("prefill_naive_max", "max"), ("prefill_flash_attention_ms", "prefill flash ms"),
             ("prefill_flash_attention_min", "min"), ("prefill_flash_attention_max", "max"),
             ("prefill_ratio", "prefill flash / naive time"),
             ("prefill_roofline_ms", "prefill roofline ms"), ("prefill_bound", "prefill bound"),
             ("prefill_naive_of_roofline", "prefill naive of roofline"),
             ("prefill_flash_attention_of_roofline", "prefill flash of roofline"))
  notes = [
      "roofline ms: the naive step's XLA FLOPs and bytes accessed over the ceilings measured in "
      "this run (" + "; ".join(ceilings.lines()) + "); bound: the ceiling that binds; "
      "'of roofline' = roofline ms / median step ms. Flash attention skips the key blocks past "
      "the causal diagonal and recomputes scores in the backward pass, so its own FLOPs differ; "
      "XLA's count of its program would see each loop body once, so the naive count is the "
      "common yardstick.",
      f"Peak MiB: XLA's memory analysis of each compiled train step (parameters, AdamW state, "
      f"batch and temporaries) on one device; a naive step above this machine's "
      f"{limit / 2**30:,.1f} GiB ({what}) is not run.",
      "prefill: the T tokens of each sequence into an empty latent cache (a jitted forward, "
      "logits of every position), no optimizer; its roofline is the naive prefill program's.",
      f"train.attn_impl=auto and generate's prefill run flash attention from T = "
      f"{FLASH_ATTENTION_MIN_TOKENS:,} (layers.masking.FLASH_ATTENTION_MIN_TOKENS). The training "
      "steps and prefills of the two paths are timed interleaved."]
  return Table(f"Training step against T: naive and flash attention, batch {batch}", columns,
               rows, notes)


def block_sizes(model: ModelConfig, pairs: list[tuple[int, int]], seq_len: int, batch: int,
                repeats: int) -> Table:
  """The flash training step at `seq_len` for each (flash_block_q, flash_block_k)."""
  calls, memory = {}, {}
  for bq, bk in pairs:
    progress(f"flash attention, blocks {bq} x {bk}, training step of {batch} x {seq_len:,}")
    config = dataclasses.replace(model, flash_block_q=bq, flash_block_k=bk)
    trainer, memory[(bq, bk)], _, _ = _step(config, batch, seq_len, "flash_attention")
    calls[(bq, bk)] = _runner(trainer, batch, seq_len, model.vocab_size)
  timings = time_interleaved(calls, repeats)
  rows = [{"block_q": bq, "block_k": bk, "step_ms": timings[(bq, bk)].median_s * 1e3,
           "min_ms": timings[(bq, bk)].min_s * 1e3, "max_ms": timings[(bq, bk)].max_s * 1e3,
           "peak_mib": memory[(bq, bk)] / 2**20} for bq, bk in pairs]
  best = min(rows, key=lambda r: r["step_ms"])
  columns = (("block_q", "flash_block_q"), ("block_k", "flash_block_k"),
             ("step_ms", "step ms (median)"), ("min_ms", "min"), ("max_ms", "max"),
             ("peak_mib", "peak MiB"))
  return Table(f"Flash attention block sizes, training step of {batch} x {seq_len:,} tokens",
               columns, rows,
               [f"The fastest here: {best['block_q']} x {best['block_k']} "
                f"({best['step_ms']:,.1f} ms); the defaults are model.flash_block_q = "
                f"{ModelConfig.flash_block_q}, flash_block_k = {ModelConfig.flash_block_k}. "
                "Steps timed interleaved."])


def check_options(args: argparse.Namespace) -> tuple[list[int], list[tuple[int, int]]]:
  """(lengths, block-size pairs) from the options, or ValueError naming the bad one: before any
  table is measured."""
  for name in ("attention_batch", "attention_repeats", "block_size_len"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: must be >= 1")
  return parse_lengths(args.attention_lengths), parse_block_sizes(args.block_sizes)


def tables(args: argparse.Namespace, model: ModelConfig) -> list[Table]:
  """The attention tables the options ask for (none when both are 'none')."""
  lengths, pairs = check_options(args)
  out = []
  if lengths:
    progress("measuring this machine's bandwidth and matmul ceilings")
    ceilings = (quick_ceilings(model.dtype) if args.quick
                else measure_ceilings(model.dtype))
    out.append(paths_against_length(model, lengths, args.attention_batch,
                                    args.attention_repeats, ceilings))
  if pairs:
    out.append(block_sizes(model, pairs, args.block_size_len, args.attention_batch,
                           args.attention_repeats))
  return out
