"""`mla-jax bench decode`: one decode step against cached context length, judged by the roofline.

The step timed is `mla_jax.sampling.decode_step`: the traced function `generate`'s decode loop
runs (decode_token), jitted with the cache donated, called through its ahead-of-time compiled
program so compilation is timed apart. A faster decode path in the library is measured here as
soon as generate uses it. Variants are rows (name, model-config overrides, attn_impl), so new
cache layouts or dtypes are one more row. Default shapes: DeepSeek-V2-Lite attention (hidden
2048, 16 heads, latent 512 + RoPE key 64, heads of 128 + 64 / 128), one layer, dense MLP.

For each step: bytes = every cache byte + every weight byte, read once (the least a step must
move); FLOPs = XLA's cost analysis of the compiled step; roofline time = max(bytes / measured
bandwidth (the faster of a copy and a read), FLOPs / measured matmul FLOP/s); achieved bytes/s
= bytes / median step time.
XLA's own "bytes accessed" is shown beside the ideal bytes: a ratio well above 1 means the
compiled step copies or re-reads the cache (the measured reason when a variant falls short).

--kernel chooses how the "MLA flash" rows attend (model.decode_kernel): XLA's flash-decoding loop
or the Pallas kernel (mla_jax/kernels). A kernel is one custom call to XLA, so its rows take
their FLOPs from the same step compiled with the XLA loop (the same arithmetic) and have no XLA
byte count. On CPU the kernel can only run interpreted: those rows check that it runs, and the
report says their times are no speed measurement. --block-sizes times the flash step per block
size (decode_block_size, or with the kernel decode_kernel_block_size); 'tune' times this
backend's candidates and names the fastest (decode_blocks.py).

The cache's float dtype is --dtype; "MLA flash int8" / "MLA flash int4" store the latent quantized
(`model.cache_dtype`: c_kv int8 or packed int4 + one float32 scale per token, k_rope bfloat16),
and their bytes count exactly those arrays. Bytes count the filled part of the cache only (the
slots holding tokens), which is what the flash step reads: the held-tokens check (--held-check T,S)
times the step on a cache of S slots holding T tokens against one of T slots holding T, the cost
of an oversized cache, which should cost what the cache holds, not its slots (docs/decode.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax.bench import add_quick_option
from mla_jax.bench.common import (Ceilings, Report, Table, Variant, base_config, cost,
                                  default_dtype, filled_cache, header_lines, measure_ceilings,
                                  nbytes, parse_ints, quick_ceilings, select_variants, time_calls,
                                  variant_config)
from mla_jax.bench.common import progress
from mla_jax.bench.decode_blocks import block_rows, block_table, parse_block_sizes
from mla_jax.config.model import DECODE_KERNELS, ModelConfig
from mla_jax.kernels.mla_decode import target_platform, uses_pallas
from mla_jax.kinds import absorbed_weights
from mla_jax.layers.masking import ATTN_IMPLS
from mla_jax.layers.precision import einsum_f32
from mla_jax.model import Transformer
from mla_jax.sampling import DECODE_ATTN_IMPL, Sampler, decode_step

# The decode paths: flash_attention is the training and prefill path (blocks of many queries),
# not a decode step's.
_ALL_PATHS = tuple(i for i in ATTN_IMPLS if i not in ("auto", "flash_attention"))
VARIANTS = (
    Variant("MLA flash"),  # generate's path: flash-decoding over the latent (--dtype cache)
    Variant("MLA flash bf16", (("cache_dtype", "bfloat16"),)),  # --dtype weights, bf16 cache
    Variant("MLA flash int8", (("cache_dtype", "int8"),)),  # the same path, quantized latent
    Variant("MLA flash int4", (("cache_dtype", "int4"),)),
    Variant("MLA absorbed", attn_impl="absorbed"),  # the plain-einsum reference, whole cache
    Variant("MLA naive", attn_impl="naive"),  # re-expands the whole cached latent every step
    Variant("MHA", (("attention", "mha"),), alternatives=_ALL_PATHS),
    Variant("GQA-8", (("attention", "gqa"), ("num_kv_heads", 8)), alternatives=_ALL_PATHS),
    Variant("MQA", (("attention", "mqa"),), alternatives=_ALL_PATHS),
)
CONTEXTS, QUICK_CONTEXTS = "1024,2048,4096,8192,16384,32768", "32"
HELD_CHECK, QUICK_HELD_CHECK = "2048,32768", "16,64"  # T tokens held, S slots


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_quick_option(parser, "--contexts", full=CONTEXTS, quick=QUICK_CONTEXTS,
                   help="cached context lengths, comma-separated")
  parser.add_argument("--batch", type=int, default=1, help="sequences per step")
  parser.add_argument("--layers", type=int, default=1, help="decoder layers in the model")
  parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                      help="model and cache dtype (default: float32 on CPU, bfloat16 otherwise)")
  parser.add_argument("--repeats", type=int, default=5, help="timed steps per point")
  parser.add_argument("--variants", default=None,
                      help=f"comma-separated subset of: {', '.join(v.name for v in VARIANTS)} "
                           "(default: all)")
  parser.add_argument("--kernel", default="auto", choices=DECODE_KERNELS,
                      help="MLA's decode attention in the 'MLA flash' rows (model.decode_kernel): "
                           "pallas = the Pallas kernel (on CPU interpreted: it runs, but its "
                           "times are no speed measurement), xla = XLA's flash-decoding loop, "
                           "auto = pallas on TPU/GPU, xla on CPU (default: %(default)s)")
  parser.add_argument("--block-sizes", default="none", metavar="N,N,...|tune",
                      help="also time the MLA flash step (--dtype cache) at the longest context "
                           "with each block size listed (model.decode_block_size, or "
                           "decode_kernel_block_size with the kernel), e.g. 64,128,256,512; "
                           "'tune' times this backend's candidates and names the fastest "
                           "(default: %(default)s)")
  add_quick_option(parser, "--held-check", full=HELD_CHECK, quick=QUICK_HELD_CHECK,
                   metavar="T,S",
                   help="also time each MLA flash variant's step on a cache of S slots holding T "
                        "tokens against one of T slots holding T, and report the ratio ('none' "
                        "skips it)")


def resolve_defaults(args: argparse.Namespace) -> None:
  """Fills the default that depends on the backend (before the command is printed)."""
  args.dtype = args.dtype or default_dtype()


def parse_held_check(text: str) -> Optional[tuple[int, int]]:
  """'2048,32768' -> (tokens held T, slots S) with T < S; 'none' -> None."""
  if str(text).strip().lower() == "none":
    return None
  values = parse_ints(text, "--held-check")
  if len(values) != 2 or values[0] >= values[1]:
    raise ValueError(f"--held-check {text!r} is invalid: expected T,S (tokens held, cache slots) "
                     "with T < S, e.g. 2048,32768, or 'none'")
  return values[0], values[1]


def whole_loop_cost(config: ModelConfig, params, token, cache, key, absorbed,
                    held: int) -> dict:
  """XLA's cost analysis of the flash step, every block counted: XLA counts a while loop's body
  once, whatever its trip count, so the step is compiled again with one block spanning the
  `held` tokens (decode_block_size = held: the loop runs once, over exactly the held slots) and
  that program's FLOPs and bytes are reported. Same code and per-slot work as the step timed;
  only the block size differs (and for the kernel, which XLA cannot see into, the path: its
  FLOPs are the XLA loop's)."""
  one_block = dataclasses.replace(config, decode_block_size=held, decode_kernel="xla")
  return cost(decode_step.lower(params, token, cache, key, absorbed, model=Transformer(one_block),
                                sampler=Sampler(), attn_impl="flash").compile())


def measure_step(config: ModelConfig, params, batch: int, context: int, attn_impl: str,
                 repeats: int, ceilings: Ceilings, slots: Optional[int] = None,
                 option: str = "--contexts") -> dict:
  """Times decode_step at `context` cached tokens: the cache has `slots` slots (default
  `context`), filled to context - steps run, so every step sees about `context` tokens. Bytes
  count the cache's first `context` slots (every stored array: latent, scales, RoPE key; or K
  and V) and every weight once."""
  model = Transformer(config)
  calls = repeats + 2
  slots = context if slots is None else slots
  if context <= calls:
    raise ValueError(f"{option} {context} is invalid: must exceed the {calls} steps timed")
  cache = filled_cache(config, batch, slots, context - calls, seed=context)
  token, key = jnp.zeros((batch,), jnp.int32), jax.random.key(0)
  absorbed = jax.jit(absorbed_weights, static_argnums=0)(config, params)  # once, as generate
  jax.clear_caches()  # a program compiled earlier (e.g. by whole_loop_cost) is compiled again
  start = time.perf_counter()
  compiled = decode_step.lower(params, token, cache, key, absorbed, model=model,
                               sampler=Sampler(), attn_impl=attn_impl).compile()
  compile_s = time.perf_counter() - start
  analysis = cost(compiled)
  kernel = attn_impl == "flash" and config.attention == "mla" and uses_pallas(
      config.decode_kernel)
  if attn_impl == "flash":
    analysis = whole_loop_cost(config, params, token, cache, key, absorbed, context)
  state = {"token": token, "cache": cache}

  def one_step():
    state["token"], state["cache"] = compiled(params, state["token"], state["cache"], key,
                                              absorbed)
    return state["token"]

  timing = time_calls(one_step, repeats, warmup=2)
  cache_bytes = nbytes(state["cache"].layers) * context // slots  # the filled part
  weight_bytes = nbytes(params)
  ideal = cache_bytes + weight_bytes
  flops = float(analysis.get("flops", 0.0))
  roofline, bound = ceilings.roofline_s(ideal, flops)
  xla_bytes = None if kernel else float(analysis.get("bytes accessed", 0.0))
  del state
  return {"context": context, "slots": slots, "batch": batch, "path": attn_impl,
          "kernel": "pallas" if kernel else "xla",
          "cache_dtype": config.kv_cache_dtype, "step_ms": timing.median_s * 1e3,
          "min_ms": timing.min_s * 1e3, "max_ms": timing.max_s * 1e3,
          "tokens_per_s": batch / timing.median_s, "cache_mb": cache_bytes / 1e6,
          "weights_mb": weight_bytes / 1e6, "bytes_per_step": ideal,
          "xla_bytes_accessed": xla_bytes,
          "xla_bytes_ratio": None if kernel else xla_bytes / ideal,
          "gflops_per_step": flops / 1e9, "achieved_gb_s": ideal / timing.median_s / 1e9,
          "bandwidth_fraction": ideal / timing.median_s / ceilings.bandwidth,
          "roofline_ms": roofline * 1e3, "bound": bound,
          "roofline_fraction": roofline / timing.median_s, "compile_s": compile_s,
          "repeats": repeats}


def layout_probe(config: ModelConfig, batch: int, context: int, repeats: int) -> dict:
  """Times the baseline layer's score einsum alone (T = 1) over its key cache in the library's
  head-major layout [B,G,S,K] (cache.KVCache) and in token-major [B,S,G,K], the layout the
  library used before: what the cache layout is worth to the baseline, measured in the same run.
  A diagnostic of one einsum, not a decode step."""
  g, h, k = config.kv_heads, config.num_heads, config.qk_head_dim
  dtype = jnp.dtype(config.dtype)
  keys = jax.random.normal(jax.random.key(1), (batch, g, context, k), dtype)  # [B,G,S,K]
  token_major = jnp.transpose(keys, (0, 2, 1, 3))  # [B,S,G,K]
  q = jax.random.normal(jax.random.key(2), (batch, 1, g, h // g, k), dtype)  # [B,T,G,J,K]
  library = jax.jit(lambda q, c: einsum_f32("BTGJK,BGSK->BGJTS", q, c))
  alternative = jax.jit(lambda q, c: einsum_f32("BTGJK,BSGK->BGJTS", q, c))
  ms = {name: time_calls(lambda f=f, c=c: f(q, c), repeats).median_s * 1e3
        for name, f, c in (("library", library, keys), ("token_major", alternative, token_major))}
  return {"context": context, "kv_bytes": int(keys.nbytes), "library_ms": ms["library"],
          "token_major_ms": ms["token_major"], "speedup": ms["token_major"] / ms["library"]}


def run(args: argparse.Namespace) -> Report:
  contexts = sorted(parse_ints(args.contexts, "--contexts"))
  for name in ("batch", "layers", "repeats"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name} {getattr(args, name)} is invalid: must be >= 1")
  held_check = parse_held_check(args.held_check)
  block_sizes = parse_block_sizes(args.block_sizes, uses_pallas(args.kernel), contexts[-1],
                                  args.quick)
  calls = args.repeats + 2  # steps each point runs: the cache must hold more tokens than that
  for option, tokens in [("--contexts", c) for c in contexts] + [
      ("--held-check", t) for t in (held_check or ())[:1]]:
    if tokens <= calls:
      raise ValueError(f"{option} {tokens} is invalid: must exceed the {calls} steps timed "
                       f"(--repeats {args.repeats} + 2 warm-up)")
  progress("measuring this machine's bandwidth and matmul ceilings")
  ceilings = (quick_ceilings(args.dtype) if args.quick
              else measure_ceilings(args.dtype))
  base = base_config(args, max(contexts + list(held_check or ())))
  chosen = select_variants([v.name for v in VARIANTS], args.variants)
  rows, choices, probes, held, seen = [], {}, {}, [], {}
  for variant in (v for v in VARIANTS if v.name in chosen):
    name, config = variant_config(base, variant)
    if is_flash_mla(variant):
      config = dataclasses.replace(config, decode_kernel=args.kernel)
    if (config, variant.attn_impl) in seen:  # e.g. "MLA flash bf16" under --dtype bfloat16
      continue
    seen[(config, variant.attn_impl)] = name
    params = Transformer(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    path = variant.attn_impl or DECODE_ATTN_IMPL
    if variant.alternatives:  # the baseline's best code path, chosen at the longest context
      paths = dict.fromkeys((path,) + variant.alternatives)  # ordered, without repeats
      tried = {}
      for impl in paths:
        progress(f"{name} ({impl} path), context {contexts[-1]:,}")
        tried[impl] = measure_step(config, params, args.batch, contexts[-1], impl, args.repeats,
                                   ceilings)
      path = min(tried, key=lambda impl: tried[impl]["step_ms"])
      choices[name] = (path, {impl: r["step_ms"] for impl, r in tried.items()})
      progress(f"{name}, cache layout probe at context {contexts[-1]:,}")
      probes[name] = layout_probe(config, args.batch, contexts[-1], args.repeats)
    for context in contexts:
      if variant.alternatives and context == contexts[-1]:
        row = tried[path]  # already measured
      else:
        progress(f"{name}, context {context:,}")
        row = measure_step(config, params, args.batch, context, path, args.repeats, ceilings)
      rows.append({"variant": name, **row})
    if held_check is not None and is_flash_mla(variant):
      tokens, slots = held_check
      progress(f"{name}, {tokens:,} tokens held in {tokens:,} and in {slots:,} slots")
      held.append(held_row(name, *(
          measure_step(config, params, args.batch, tokens, path, args.repeats, ceilings,
                       slots=n, option="--held-check") for n in (tokens, slots))))
    del params
  blocks = block_rows(dataclasses.replace(base, decode_kernel=args.kernel), args.batch,
                      contexts[-1], block_sizes, args.repeats, ceilings, measure_step)
  return Report("decode", header_lines(args.dtype, args.command) + ceilings.lines()
                + [kernel_line(args.kernel)],
                [steps_table(rows), summary_table(rows, contexts[-1], choices, args.dtype)]
                + ([layout_table(probes)] if probes else [])
                + ([held_table(held)] if held else [])
                + ([block_table(blocks)] if blocks else []),
                plot=lambda png: plot(rows, ceilings, png))


def kernel_line(decode_kernel: str) -> str:
  """The header line saying how the MLA flash rows attend, and whether their times mean
  anything."""
  if not uses_pallas(decode_kernel):
    return f"MLA flash rows: XLA's flash-decoding loop (--kernel {decode_kernel})"
  line = f"MLA flash rows: the Pallas decode kernel (--kernel {decode_kernel})"
  if target_platform() == "cpu":
    line += (", run in TPU interpret mode on CPU: a check that it runs and agrees, NOT a speed "
             "measurement (its times are the simulator's)")
  return line


def is_flash_mla(variant: Variant) -> bool:
  """generate's MLA decode path (any cache dtype): the variants the held-tokens check times."""
  return variant.name.startswith("MLA flash")


def held_row(name: str, exact: dict, oversized: dict) -> dict:
  """One held-tokens row: the step on a cache of exactly T slots and on one of S > T slots,
  both holding T tokens."""
  return {"variant": name, "tokens": exact["context"], "slots": oversized["slots"],
          "cache_dtype": exact["cache_dtype"], "bytes_per_step": exact["bytes_per_step"],
          "exact_ms": exact["step_ms"], "exact_min_ms": exact["min_ms"],
          "exact_max_ms": exact["max_ms"], "oversized_ms": oversized["step_ms"],
          "oversized_min_ms": oversized["min_ms"], "oversized_max_ms": oversized["max_ms"],
          "ratio": oversized["step_ms"] / exact["step_ms"],
          "exact_xla_bytes": exact["xla_bytes_accessed"],
          "oversized_xla_bytes": oversized["xla_bytes_accessed"],
          "exact_compile_s": exact["compile_s"], "oversized_compile_s": oversized["compile_s"]}


STEP_COLUMNS = (("variant", "variant"), ("path", "attn_impl"), ("kernel", "kernel"),
                ("cache_dtype", "cache"),
                ("context", "context"),
                ("step_ms", "step ms (median)"), ("min_ms", "min"), ("max_ms", "max"),
                ("tokens_per_s", "tokens/s"), ("bytes_per_step", "bytes/step (cache + weights)"),
                ("xla_bytes_ratio", "XLA bytes accessed / bytes"),
                ("gflops_per_step", "GFLOP/step"), ("achieved_gb_s", "achieved GB/s"),
                ("bandwidth_fraction", "of bandwidth"), ("roofline_ms", "roofline ms"),
                ("bound", "bound"), ("roofline_fraction", "of roofline"),
                ("compile_s", "compile s"))


def steps_table(rows: list[dict]) -> Table:
  notes = [
      "bytes/step counts each cache and weight byte once; roofline = max(bytes / measured "
      "bandwidth, XLA FLOPs / matmul FLOP/s); 'of roofline' = roofline time / measured time; "
      "'of bandwidth' = achieved bytes/s / measured bandwidth. XLA counts a while loop's body "
      "once, so a flash row's FLOPs and XLA bytes come from the same step compiled with one "
      "block spanning the cache (every block counted)."]
  title = "Decode step against cached context"
  if any(r["kernel"] == "pallas" for r in rows):
    notes.append("A 'pallas' row's FLOPs are those of the same step with XLA's loop (the same "
                 "arithmetic); XLA cannot count a kernel's bytes ('-').")
    if target_platform() == "cpu":
      title += " (pallas rows: the kernel interpreted on CPU, NOT a speed measurement)"
  return Table(title, STEP_COLUMNS, rows, notes)


def summary_table(rows: list[dict], context: int, choices: dict, dtype: str) -> Table:
  at = {r["variant"]: r for r in rows if r["context"] == context}
  mla = at.get("MLA flash")  # generate's path: every ratio is against it
  out = []
  for name, row in at.items():
    summary = {"variant": name, "path": row["path"], "step_ms": row["step_ms"],
               "bandwidth_fraction": row["bandwidth_fraction"],
               "xla_bytes_ratio": row["xla_bytes_ratio"], "bound": row["bound"],
               "alternatives": ", ".join(f"{impl} {ms:,.2f} ms"
                                         for impl, ms in choices[name][1].items())
               if name in choices else "-"}
    if mla is not None:
      summary["vs_mla"] = row["step_ms"] / mla["step_ms"]
      summary["vs_mla_fraction"] = row["bandwidth_fraction"] / mla["bandwidth_fraction"]
    out.append(summary)
  notes = []
  for name, what in (("MLA naive", "the naive MLA step (re-expanding the whole latent)"),
                     ("MLA absorbed", "the absorbed reference (plain einsums over all slots)")):
    if mla is not None and name in at:
      ratio = at[name]["step_ms"] / mla["step_ms"]
      notes.append(f"At {context:,} cached tokens {what} takes {ratio:,.2f}x the absorbed "
                   "flash-decoding step that generate uses.")
  for name in ("MLA flash bf16", "MLA flash int8", "MLA flash int4"):
    if mla is not None and name in at:
      quantized = at[name]
      xla_bytes = ("" if quantized["xla_bytes_accessed"] is None else
                   f", its XLA bytes accessed "
                   f"{quantized['xla_bytes_accessed'] / mla['xla_bytes_accessed']:,.3f}x")
      notes.append(
          f"At {context:,} cached tokens the {quantized['cache_dtype']} cache's flash step takes "
          f"{quantized['step_ms'] / mla['step_ms']:,.2f}x the {dtype} cache's; its cache bytes "
          f"are {quantized['cache_mb'] / mla['cache_mb']:,.3f}x{xla_bytes}.")
  notes.append("Baselines: every attention path the layer accepts was timed at this context and "
               "the fastest kept (last column). Where a variant's share of the bandwidth is "
               "low, 'XLA bytes accessed / bytes' shows how many times its compiled step moves "
               "the cache + weights.")
  columns = (("variant", "variant"), ("path", "attn_impl kept"), ("step_ms", "step ms"),
             ("vs_mla", "x MLA flash time"), ("bandwidth_fraction", "of bandwidth"),
             ("vs_mla_fraction", "x MLA's bandwidth share"),
             ("xla_bytes_ratio", "XLA bytes accessed / bytes"), ("bound", "bound"),
             ("alternatives", "paths measured (step ms)"))
  return Table(f"At the longest context ({context:,} tokens)", columns, out, notes)


def layout_table(probes: dict) -> Table:
  rows = [{"variant": name, **probe} for name, probe in probes.items()]
  columns = (("variant", "baseline"), ("context", "context"), ("kv_bytes", "key cache bytes"),
             ("library_ms", "scores einsum ms, cache [B,G,S,K] (the library's)"),
             ("token_major_ms", "same, cache [B,S,G,K]"),
             ("speedup", "x faster, the library's layout"))
  return Table("Baseline key-cache layout: the score einsum alone", columns, rows, [
      "The baselines' cache is head-major, [B,G,S,K] and [B,G,S,V] (cache.KVCache): the "
      "decode dots have B and G as leading batch dimensions and read each head's [S,K] keys "
      "as they lie. Token-major [B,S,G,K], the layout the library used before, puts G in the "
      "middle, and XLA compiles the dot over it with a transposed copy of the cache: the "
      "measured reason the baselines' steps fell short of the bandwidth, and why the library "
      "keeps head-major."])


HELD_COLUMNS = (("variant", "variant"), ("cache_dtype", "cache"), ("tokens", "tokens held T"),
                ("slots", "slots S"), ("bytes_per_step", "bytes/step (filled cache + weights)"),
                ("exact_ms", "step ms, T slots (median)"), ("exact_min_ms", "min"),
                ("exact_max_ms", "max"), ("oversized_ms", "step ms, S slots (median)"),
                ("oversized_min_ms", "min"), ("oversized_max_ms", "max"),
                ("ratio", "x (S slots / T slots)"), ("exact_xla_bytes", "XLA bytes, T slots"),
                ("oversized_xla_bytes", "XLA bytes, S slots"))


def held_table(held: list[dict]) -> Table:
  tokens, slots = held[0]["tokens"], held[0]["slots"]
  return Table(f"A cache of {slots:,} slots holding {tokens:,} tokens", HELD_COLUMNS, held, [
      f"The same flash step on a cache sized for {slots:,} tokens and on one sized for exactly "
      f"the {tokens:,} it holds: the loop stops at the longest sequence, so the step should cost "
      "what it holds, not its slots (target: ratio <= 1.5). Each step timed as in the first "
      "table; XLA bytes are XLA's cost analysis of each step with every block counted (one "
      "block spanning the held tokens, as in the first table): equal bytes for S and T slots "
      "mean the step reads what the cache holds."])


def plot(rows: list[dict], ceilings: Ceilings, path: Path) -> None:
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7.5, 5))
  for name in dict.fromkeys(r["variant"] for r in rows):
    points = [(r["bytes_per_step"], r["step_ms"]) for r in rows if r["variant"] == name]
    ax.plot(*zip(*points), "o-", label=name)
  span = np.geomspace(min(r["bytes_per_step"] for r in rows),
                      max(r["bytes_per_step"] for r in rows), 50)
  ax.plot(span, span / ceilings.bandwidth * 1e3, "k--",
          label=f"bytes / measured bandwidth ({ceilings.bandwidth / 1e9:.1f} GB/s)")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("bytes per step: cache + weights (log)")
  ax.set_ylabel("step time, ms (median; log)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
