"""`mla-jax bench throughput`: generated tokens/s at a fixed cache memory budget.

The DeepSeek-V2 paper's 5.76x generation throughput comes from batch size: a smaller cache lets
more sequences share the same memory. Here each attention gets the largest batch whose cache
(`init_cache` of `--context` slots per sequence, exact bytes from its shapes) fits `--budget`,
and then generates through `mla_jax.generate` itself (one prefill, then the compiled decode loop).
Same model shapes as `bench decode` (DeepSeek-V2-Lite attention, one layer by default).
"MLA int8" / "MLA int4" store the latent quantized (`model.cache_dtype`: c_kv int8 or packed int4
+ one float32 scale per token, k_rope bfloat16): smaller sequences, so a larger batch at the
same budget; "MLA" and the baselines cache in --dtype.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax.bench import add_quick_option
from mla_jax.bench.common import (Report, Table, Variant, base_config, default_dtype,
                                  header_lines, nbytes, parse_bytes, select_variants, time_calls,
                                  variant_config)
from mla_jax.bench.common import progress
from mla_jax.kinds import init_cache
from mla_jax.model import Transformer
from mla_jax.sampling import generate
from mla_jax.device_memory import device_memory_available

PAPER_RATIO = 5.76
VARIANTS = (
    Variant("MLA"),
    Variant("MLA int8", (("cache_dtype", "int8"),)),
    Variant("MLA int4", (("cache_dtype", "int4"),)),
    Variant("MHA", (("attention", "mha"),)),
    Variant("GQA-8", (("attention", "gqa"), ("num_kv_heads", 8))),
    Variant("MQA", (("attention", "mqa"),)),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_quick_option(parser, "--budget", full="4GiB", quick="256KiB",
                   help="cache memory for the whole batch, e.g. 4GiB or 256MiB; on a CPU, 4GiB "
                        "means batches of thousands")
  add_quick_option(parser, "--context", full=1024, quick=24, type=int,
                   help="cache slots per sequence = prompt + new tokens")
  add_quick_option(parser, "--prompt-tokens", full=16, quick=4, type=int,
                   help="prompt length; the rest of the context is generated")
  parser.add_argument("--max-batch", type=int, default=None,
                      help="cap every batch; the table says when it applied (default: no cap)")
  parser.add_argument("--layers", type=int, default=1, help="decoder layers in the model")
  parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                      help="model and cache dtype (default: float32 on CPU, bfloat16 otherwise)")
  add_quick_option(parser, "--repeats", full=3, quick=1, type=int,
                   help="timed generate calls per attention")
  parser.add_argument("--variants", default=None,
                      help=f"comma-separated subset of: {', '.join(v.name for v in VARIANTS)} "
                           "(default: all)")


def resolve_defaults(args: argparse.Namespace) -> None:
  """Fills the default that depends on the backend (before the command is printed)."""
  args.dtype = args.dtype or default_dtype()


def sequence_bytes(config, context: int) -> int:
  """Cache bytes of one sequence of `context` slots, all layers (its length counter included)."""
  shapes = jax.eval_shape(lambda: init_cache(config, 1, context))
  return nbytes(shapes)


def run(args: argparse.Namespace) -> Report:
  budget = parse_bytes(args.budget, "--budget")
  for name in ("context", "repeats"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name} {getattr(args, name)} is invalid: must be >= 1")
  available = device_memory_available(jax.devices()[:1])
  if available is not None and budget > available[0]:
    raise ValueError(f"--budget {args.budget} is invalid: it exceeds the memory one device has "
                     f"({available[0] / 2**30:,.2f} GiB, {available[1]}); choose a smaller "
                     "budget")
  if not 0 < args.prompt_tokens < args.context:
    raise ValueError(f"--prompt-tokens {args.prompt_tokens} is invalid: must be in "
                     f"[1, --context={args.context})")
  if args.max_batch is not None and args.max_batch < 1:
    raise ValueError(f"--max-batch {args.max_batch} is invalid: must be >= 1")
  new_tokens = args.context - args.prompt_tokens
  base = base_config(args, args.context)
  chosen = select_variants([v.name for v in VARIANTS], args.variants)
  rows = []
  for variant in (v for v in VARIANTS if v.name in chosen):
    name, config = variant_config(base, variant)
    per_sequence = sequence_bytes(config, args.context)
    fits = budget // per_sequence
    if fits < 1:
      raise ValueError(f"--budget {args.budget} holds no {name} sequence: one takes "
                       f"{per_sequence:,} bytes at --context {args.context}")
    batch = fits if args.max_batch is None else min(fits, args.max_batch)
    progress(f"{name}, batch {batch:,}, context {args.context:,} ({args.repeats} timed "
             "generate calls)")
    model = Transformer(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    prompts = np.random.default_rng(0).integers(0, config.vocab_size,
                                                (batch, args.prompt_tokens), dtype=np.int32)
    full = np.full((batch,), args.prompt_tokens)  # every prompt token is real
    timing = time_calls(lambda: generate(model, params, prompts, max_new_tokens=new_tokens,
                                         lengths=full),
                        args.repeats)
    rows.append({"variant": name, "cache_dtype": config.kv_cache_dtype,
                 "bytes_per_sequence": per_sequence,
                 "batch_fits": int(fits), "batch": int(batch),
                 "cache_bytes": int(batch * per_sequence), "new_tokens": new_tokens,
                 "seconds": timing.median_s, "min_s": timing.min_s, "max_s": timing.max_s,
                 "tokens_per_s": batch * new_tokens / timing.median_s,
                 "first_call_s": timing.first_call_s, "repeats": timing.repeats})
    del params
  by_name = {r["variant"]: r for r in rows}
  mha, mla = by_name.get("MHA"), by_name.get("MLA")
  for row in rows:
    row["vs_mha"] = None if mha is None else row["tokens_per_s"] / mha["tokens_per_s"]
  notes = []
  if mla is not None and mha is not None:
    notes.append(
        f"MLA / MHA generated tokens/s at a {args.budget} cache budget: {mla['vs_mha']:,.2f}x "
        f"(batch {mla['batch']:,} vs {mha['batch']:,}). The paper's {PAPER_RATIO}x was measured "
        "on 8 H800 GPUs, DeepSeek-V2 (MLA, ~6-bit cache, MoE) against DeepSeek 67B (dense, GQA), "
        "with the whole model's weights in the same memory: a different comparison than this "
        "model's.")
  for name in ("MLA int8", "MLA int4"):
    if mla is not None and name in by_name:
      quantized = by_name[name]
      notes.append(f"{name}: {quantized['bytes_per_sequence'] / mla['bytes_per_sequence']:,.3f}x "
                   f"the bytes per sequence of the {args.dtype} MLA cache, batch "
                   f"{quantized['batch']:,} vs {mla['batch']:,}, "
                   f"{quantized['tokens_per_s'] / mla['tokens_per_s']:,.2f}x its tokens/s.")
  notes.append("tokens/s = batch x new tokens / wall time of one `generate` call (prefill of "
               f"{args.prompt_tokens} prompt tokens included; compilation excluded: the first "
               "call is timed apart).")
  capped = [r["variant"] for r in rows if r["batch"] < r["batch_fits"]]
  if capped:
    notes.append(f"--max-batch {args.max_batch} capped: {', '.join(capped)}.")
  columns = (("variant", "attention"), ("cache_dtype", "cache"),
             ("bytes_per_sequence", "cache bytes / sequence"),
             ("batch", "batch"), ("cache_bytes", "cache bytes used"),
             ("new_tokens", "new tokens / sequence"), ("seconds", "generate s (median)"),
             ("min_s", "min"), ("max_s", "max"), ("tokens_per_s", "generated tokens/s"),
             ("vs_mha", "x MHA"), ("first_call_s", "first call s (compile)"))
  table = Table(f"Generation at a {args.budget} cache budget, {args.context:,}-token context",
                columns, rows, notes)
  return Report("throughput", header_lines(args.dtype, args.command), [table],
                plot=lambda png: plot(rows, args, png))


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4))
  names = [r["variant"] for r in rows]
  values = [r["tokens_per_s"] for r in rows]
  ax.bar(names, values, color=["tab:red" if n.startswith("MLA") else "tab:gray" for n in names])
  for i, r in enumerate(rows):
    ratio = "" if r["vs_mha"] is None else f"\n{r['vs_mha']:.2f}x MHA"
    ax.text(i, r["tokens_per_s"], f"batch {r['batch']:,}{ratio}", ha="center", va="bottom",
            fontsize=8)
  ax.set_ylabel("generated tokens/s")
  ax.set_title(f"cache budget {args.budget}, context {args.context:,}")
  ax.margins(y=0.2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
