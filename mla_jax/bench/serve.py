"""`mla-jax bench serve`: many requests at a fixed cache budget, through the serving engine.

The DeepSeek-V2 paper's 5.76x generation throughput is a serving figure: as many concurrent
requests as the cache memory allows. Here a seeded synthetic workload (bench/workload.py) runs
through `mla_jax.serving.Engine` with its page pool sized to `--budget` bytes, for MLA (float,
int8, int4 latents) and MHA/GQA/MQA of the same shapes, and through the padded `generate` path at
the same budget (batches taken first come first served, each as large as the budget holds with
every row's cache sized to the batch's longest prompt plus its largest max_tokens, as generate
sizes it).

Times are on a clock that leaves JAX's compiles out (compile_clock.RunClock): the engine compiles
its programs ahead, a padded batch of a new shape compiles mid-run; both are reported apart.
Per run: requests/s, output tokens/s, time to first token (TTFT: from the request's arrival to
the step that produced its first token; for padded generate, which returns a batch whole, to the
end of its batch) and inter-token latency (ITL: between consecutive tokens of a request), p50 and
p99, and the sequences holding cache (mean over time, weighted by step duration, and peak).

Roofline of each engine run: FLOPs = 2 x (parameters outside the embedding) per computed token
plus attention's 2 x H x (2C + R) (MLA) or 2 x H x (K + V) (the baselines) per cached position each
query attends, per layer; bytes = the weights once per step program run plus each decode token's
held cache once; time = max(bytes / measured bandwidth, FLOPs / measured matmul FLOP/s).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax.bench import add_quick_option
from mla_jax.bench.common import (Report, Table, base_config, count_params, default_dtype,
                                  header_lines, measure_ceilings, nbytes, parse_bytes,
                                  parse_ints, progress, select_variants, variant_config)
from mla_jax.bench.throughput import PAPER_RATIO, VARIANTS
from mla_jax.bench.workload import Workload, make_workload
from mla_jax.compile_clock import RunClock
from mla_jax.kinds import cache_bytes_per_token, init_cache
from mla_jax.model import Transformer
from mla_jax.sampling import generate
from mla_jax.serving.engine import DEFAULT_PAGE_SIZE, Engine, bytes_per_page
from mla_jax.serving.requests import SamplingParams

ARRIVALS = ("burst", "poisson")
HELD_MARGIN = 0.10  # MLA should hold (MHA bytes / MLA bytes per token) less this share x MHA's


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_quick_option(parser, "--budget", full="24MiB", quick="96KiB",
                   help="cache memory of every run (the engine's page pool; padded generate's "
                        "batches), e.g. 24MiB")
  add_quick_option(parser, "--requests", full=256, quick=24, type=int,
                   help="requests in the workload")
  add_quick_option(parser, "--prompt-median", full=64.0, quick=6.0, type=float,
                   help="median prompt length, tokens (log-normal)")
  add_quick_option(parser, "--output-median", full=64.0, quick=6.0, type=float,
                   help="median max_tokens, tokens (log-normal)")
  parser.add_argument("--sigma", type=float, default=0.8,
                      help="log-normal shape of both lengths: the tail (0 = every request alike)")
  add_quick_option(parser, "--context", full=1024, quick=48, type=int,
                   help="prompt + output at most; the model's max_seq_len")
  parser.add_argument("--rate", default="auto",
                      help="Poisson arrivals, requests/s (default auto: 0.75x the first "
                           "variant's engine request rate with all arriving at once)")
  parser.add_argument("--arrivals", default=",".join(ARRIVALS),
                      help="which arrival patterns to run: burst (all at once), poisson")
  parser.add_argument("--max-seqs", type=int, default=256,
                      help="the engine's rows (capped at --requests); pages bound it too")
  add_quick_option(parser, "--page-size", full=DEFAULT_PAGE_SIZE, quick=4, type=int,
                   help="token slots per page")
  add_quick_option(parser, "--page-sizes", full="8,16,32,64", quick="4,8",
                   help="page sizes to compare for the first variant (burst arrivals); 'none' "
                        "skips the comparison")
  add_quick_option(parser, "--prefill-chunk", full=None, quick=16, type=int,
                   shown="the engine's", help="prompt tokens per prefill row")
  parser.add_argument("--prefill-rows", type=int, default=None,
                      help="prefill rows per step (default: the engine's)")
  parser.add_argument("--padded-variants", default="MLA",
                      help="variants also run through padded generate ('none' for none)")
  parser.add_argument("--layers", type=int, default=1, help="decoder layers in the model")
  parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                      help="model and cache dtype (default: float32 on CPU, bfloat16 otherwise)")
  add_quick_option(parser, "--repeats", full=2, quick=1, type=int,
                   help="runs of each (variant, path, arrivals); the median is reported")
  parser.add_argument("--seed", type=int, default=0, help="the workload's seed")
  parser.add_argument("--variants", default=None,
                      help=f"comma-separated subset of: {', '.join(v.name for v in VARIANTS)} "
                           "(default: all)")


def resolve_defaults(args: argparse.Namespace) -> None:
  args.dtype = args.dtype or default_dtype()


# ---- one run ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Served:
  """What happened to one request, in RunClock seconds."""

  arrival_s: float
  token_s: list[float] = dataclasses.field(default_factory=list)  # when each token came out


@dataclasses.dataclass
class RunLog:
  served: list[Served]
  held: list[tuple[float, int]]  # (seconds, sequences holding cache) per step or batch
  duration_s: float
  counters: dict  # engine stats over the run (engine runs only)


def drive_engine(engine: Engine, workload: Workload) -> RunLog:
  """Feeds the workload's requests to the engine at their arrival times and steps it until all
  are done."""
  clock, pending = RunClock(), collections.deque(workload.requests)
  served: dict[str, Served] = {}
  held, before = [], engine.stats
  clock.start()
  while pending or engine.has_unfinished():
    while pending and pending[0].arrival_s <= clock.now():
      request = pending.popleft()
      rid = engine.add_request(list(request.prompt), SamplingParams(max_tokens=request.max_tokens))
      served[rid] = Served(request.arrival_s)
    if not engine.has_unfinished():
      clock.sleep_until(pending[0].arrival_s)
      continue
    start = clock.now()
    outputs = engine.step()
    end = clock.now()
    for out in outputs:
      served[out.request_id].token_s += [end] * len(out.new_tokens)
    held.append((end - start, engine.stats["running"] + sum(o.finished for o in outputs)))
  after = engine.stats
  counters = {k: after[k] - before[k] for k in ("preemptions", "decode_runs", "prefill_runs",
                                                "prefill_tokens", "decode_tokens")}
  counters["peak_running"] = max((n for _, n in held), default=0)
  return RunLog(list(served.values()), held, clock.now(), counters)


def padded_batches_fit(config, budget: int):
  """bytes(batch, length) of generate's cache for `batch` rows of `length` slots, cached."""
  cache = {}

  def bytes_for(rows: int, length: int) -> int:
    if length not in cache:
      cache[length] = nbytes(jax.eval_shape(lambda: init_cache(config, 1, length)))
    return rows * cache[length]

  return lambda rows, length: bytes_for(rows, length) <= budget


def drive_padded(model, params, workload: Workload, budget: int) -> RunLog:
  """The padded generate path: when the previous batch is done, the requests that have arrived
  form the next, first come first served, as many as fit the budget with each row's cache of
  (longest prompt + largest max_tokens) slots; a batch's tokens all come out when it ends."""
  fits = padded_batches_fit(model.config, budget)
  clock, pending = RunClock(), collections.deque(workload.requests)
  served, held = [], []
  clock.start()
  while pending:
    if pending[0].arrival_s > clock.now():
      clock.sleep_until(pending[0].arrival_s)
      continue
    batch = [pending.popleft()]
    while pending and pending[0].arrival_s <= clock.now():
      candidate = batch + [pending[0]]
      length = max(len(r.prompt) for r in candidate) + max(r.max_tokens for r in candidate)
      if not fits(len(candidate), length):
        break
      batch.append(pending.popleft())
    start = clock.now()
    jax.block_until_ready(generate(model, params, [list(r.prompt) for r in batch],
                                   max_new_tokens=max(r.max_tokens for r in batch)))
    end = clock.now()
    served += [Served(r.arrival_s, [end] * r.max_tokens) for r in batch]
    held.append((end - start, len(batch)))
  return RunLog(served, held, clock.now(), {"batches": len(held)})


def percentile(values: list[float], q: float) -> Optional[float]:
  return float(np.percentile(values, q)) if values else None


def summarize(log: RunLog) -> dict:
  """Throughput, latency percentiles and sequences held of one run."""
  ttft = [s.token_s[0] - s.arrival_s for s in log.served]
  gaps = [b - a for s in log.served for a, b in zip(s.token_s, s.token_s[1:])]
  distinct = any(b > a for s in log.served for a, b in zip(s.token_s, s.token_s[1:]))
  total = sum(d for d, _ in log.held)
  tokens = sum(len(s.token_s) for s in log.served)
  return {"seconds": log.duration_s, "requests_per_s": len(log.served) / log.duration_s,
          "tokens_per_s": tokens / log.duration_s, "output_tokens": tokens,
          "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
          "itl_p50": percentile(gaps, 50) if distinct else None,
          "itl_p99": percentile(gaps, 99) if distinct else None,
          "held_mean": sum(d * n for d, n in log.held) / total if total else 0.0,
          "held_peak": max((n for _, n in log.held), default=0), **log.counters}


def median_run(runs: list[dict]) -> dict:
  """The run of median output tokens/s, with min and max of that figure across runs."""
  ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
  row = dict(ordered[(len(ordered) - 1) // 2])
  row.update(tokens_per_s_min=ordered[0]["tokens_per_s"],
             tokens_per_s_max=ordered[-1]["tokens_per_s"], runs=len(runs))
  return row


# ---- the roofline ----------------------------------------------------------------------------

def attention_flops_per_position(config) -> int:
  """FLOPs one query spends on one cached position, all layers: MLA's absorbed scores over the
  latent and RoPE key plus the weighted latent, 2H(2C + R); a baseline's 2H(K + V)."""
  h = config.num_heads
  if config.attention == "mla":
    width = 2 * config.kv_lora_rank + config.qk_rope_head_dim
  else:
    width = config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim
  return 2 * h * width * config.num_layers


def engine_roofline(config, workload: Workload, counters: dict, ceilings) -> dict:
  """The run's FLOPs and bytes (module docstring) and the roofline time they set."""
  matmul_params = count_params(config) - config.vocab_size * config.hidden_size  # no embedding
  weight_bytes = count_params(config) * jnp.dtype(config.param_dtype).itemsize
  per_position = attention_flops_per_position(config)
  per_token = cache_bytes_per_token(config)
  computed = counters["prefill_tokens"] + counters["decode_tokens"]
  attended = 0  # cached positions read by all queries: sum over tokens of (position + 1)
  decode_held = 0
  for r in workload.requests:
    p, m = len(r.prompt), r.max_tokens
    attended += p * (p + 1) // 2 + sum(range(p + 1, p + m))
    decode_held += sum(range(p + 1, p + m))
  flops = 2 * matmul_params * computed + per_position * attended
  num_bytes = (weight_bytes * (counters["decode_runs"] + counters["prefill_runs"])
               + per_token * decode_held)
  seconds, bound = ceilings.roofline_s(num_bytes, flops)
  return {"flops": flops, "bytes": num_bytes, "roofline_s": seconds, "bound": bound}


# ---- the suite -------------------------------------------------------------------------------

def _check(args: argparse.Namespace) -> tuple[int, list[str], Optional[list[int]]]:
  budget = parse_bytes(args.budget, "--budget")
  for name in ("max_seqs", "page_size", "layers", "repeats"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: must be >= 1")
  arrivals = [a.strip() for a in str(args.arrivals).split(",") if a.strip()]
  if not arrivals or any(a not in ARRIVALS for a in arrivals):
    raise ValueError(f"--arrivals {args.arrivals!r} is invalid: choose from "
                     f"{', '.join(ARRIVALS)}")
  if args.rate != "auto":
    try:
      rate = float(args.rate)
    except ValueError:
      rate = float("nan")
    if not rate > 0 or rate == float("inf"):
      raise ValueError(f"--rate {args.rate!r} is invalid: a positive number of requests/s, or "
                       "auto")
  page_sizes = (None if str(args.page_sizes).lower() == "none"
                else parse_ints(args.page_sizes, "--page-sizes"))
  return budget, arrivals, page_sizes


def _engine(model, params, args, budget: int, page_size: int) -> Engine:
  options = {k: v for k, v in (("prefill_chunk", args.prefill_chunk),
                               ("prefill_rows", args.prefill_rows)) if v is not None}
  return Engine(model, params, max_seqs=min(args.max_seqs, args.requests), page_size=page_size,
                cache_budget_bytes=budget, **options)


def _check_fits(config, name: str, workload: Workload, args, budget: int,
                page_sizes: list[int], padded: bool) -> None:
  """Refuses, before any work, a budget that cannot hold the workload's longest request: in
  the engine's pool at each page size, and (padded) as one row of generate's cache."""
  longest = max(len(r.prompt) + r.max_tokens for r in workload.requests)
  for size in page_sizes:
    pages = budget // bytes_per_page(config, size)
    if pages * size < longest:
      raise ValueError(f"--budget {args.budget} is too small for {name}: its longest request "
                       f"({longest:,} tokens) needs {-(-longest // size):,} pages of {size} "
                       f"tokens and the budget holds {pages:,}; give a larger --budget")
  if padded and not padded_batches_fit(config, budget)(1, longest):
    raise ValueError(f"--budget {args.budget} is too small for {name} through padded generate: "
                     f"one cache of {longest:,} tokens does not fit; give a larger --budget")


def _runs(run_once, repeats: int) -> dict:
  """One untimed warm-up run (first executions, and padded generate's compiles), then the
  median of `repeats` runs."""
  run_once()
  return median_run([summarize(run_once()) for _ in range(repeats)])


def run(args: argparse.Namespace) -> Report:
  budget, arrivals, page_sizes = _check(args)
  workload = make_workload(args.requests, prompt_median=args.prompt_median,
                           output_median=args.output_median, sigma=args.sigma,
                           context=args.context, seed=args.seed)
  base = base_config(args, args.context)
  chosen = select_variants([v.name for v in VARIANTS], args.variants)
  padded_names = ([] if str(args.padded_variants).lower() == "none" else
                  select_variants([v.name for v in VARIANTS], args.padded_variants,
                                  "--padded-variants"))
  rate = None if args.rate == "auto" else float(args.rate)
  variants = []
  for variant in (v for v in VARIANTS if v.name in chosen):
    name, config = variant_config(base, variant)
    sizes = [args.page_size] + (page_sizes if page_sizes and not variants else [])
    _check_fits(config, name, workload, args, budget, sizes, name in padded_names)
    variants.append((name, config))
  progress("measuring the machine's ceilings (copy bandwidth, matmul FLOP/s)")
  ceilings = measure_ceilings(args.dtype)
  rows = {arrival: [] for arrival in arrivals}
  page_rows = []
  for name, config in variants:
    model = Transformer(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    progress(f"{name}: compiling the engine's programs")
    engine = _engine(model, params, args, budget, args.page_size)
    for arrival in arrivals:
      if arrival == "poisson" and rate is None:  # auto: from the first burst run measured
        first = rows.get("burst") or []
        if not first:
          first = [_engine_row(engine, workload, args, ceilings, config, name, None)]
        rate = 0.75 * first[0]["requests_per_s"]
      at = workload.arriving_at(None if arrival == "burst" else rate, args.seed)
      progress(f"{name}: engine, {arrival} ({args.repeats} runs)")
      rows[arrival].append(_engine_row(engine, at, args, ceilings, config, name, arrival))
      if name in padded_names:
        progress(f"{name}: padded generate, {arrival} ({args.repeats} runs)")
        row = _runs(lambda: drive_padded(model, params, at, budget), args.repeats)
        row.update(variant=name, path="padded generate", cache_dtype=config.kv_cache_dtype,
                   bytes_per_token=cache_bytes_per_token(config))
        rows[arrival].append(row)
    if page_sizes and not page_rows:  # the first variant: which page size serves it best
      burst = workload.arriving_at(None, args.seed)
      for size in page_sizes:
        progress(f"{name}: engine with pages of {size} tokens")
        sized = engine if size == args.page_size else _engine(model, params, args, budget, size)
        row = _engine_row(sized, burst, args, ceilings, config, name, "burst")
        row["page_size"] = size
        page_rows.append(row)
    del engine, params
  tables = [_table(arrival, rows[arrival], workload, args, rate) for arrival in arrivals]
  if page_rows:
    tables.append(_page_table(page_rows, args))
  return Report("serve", header_lines(args.dtype, args.command) + ceilings.lines(), tables,
                plot=lambda png: plot(rows, args, png))


def _engine_row(engine: Engine, workload: Workload, args, ceilings, config, name: str,
                arrival: Optional[str]) -> dict:
  def once() -> RunLog:
    engine.reset_prefix_cache()  # a repeat must not find its own prompts cached
    return drive_engine(engine, workload)

  row = _runs(once, args.repeats if arrival else 1)
  roof = engine_roofline(config, workload, row, ceilings)
  row.update(variant=name, path="engine", cache_dtype=config.kv_cache_dtype,
             bytes_per_token=engine.bytes_per_token, num_pages=engine.num_pages,
             page_size=engine.page_size, max_seqs=engine.max_seqs, programs=engine.num_programs,
             compile_s=engine.compile_s, roofline_s=roof["roofline_s"], bound=roof["bound"],
             of_roofline=roof["roofline_s"] / row["seconds"])
  return row


def _table(arrival: str, rows: list[dict], workload: Workload, args, rate) -> Table:
  at = workload.arriving_at(None if arrival == "burst" else rate, args.seed)
  engine = {r["variant"]: r for r in rows if r["path"] == "engine"}
  mha = engine.get("MHA")
  for row in rows:
    row["vs_mha"] = None if mha is None else row["tokens_per_s"] / mha["tokens_per_s"]
    row["held_vs_mha"] = None if mha is None else row["held_mean"] / mha["held_mean"]
  notes = [f"Workload: {at.description}; {at.prompt_tokens:,} prompt and {at.output_tokens:,} "
           f"output tokens. Budget {args.budget} of cache for every row."]
  mla = engine.get("MLA")
  if mla is not None and mha is not None:
    ratio = mha["bytes_per_token"] / mla["bytes_per_token"]
    target = (1 - HELD_MARGIN) * ratio
    notes.append(
        f"MLA / MHA output tokens/s through the engine: {mla['vs_mha']:,.2f}x (the paper: "
        f"{PAPER_RATIO}x, DeepSeek-V2 against DeepSeek 67B on H800s). Sequences held: "
        f"{mla['held_vs_mha']:,.2f}x MHA's on average (peak {mla['held_peak']:,} vs "
        f"{mha['held_peak']:,}); MHA caches {ratio:,.2f}x MLA's bytes per token" +
        (f", so the aim is >= {target:,.2f}x "
         f"({'met' if mla['held_vs_mha'] >= target else 'NOT met'})." if arrival == "burst" else
         ". At a rate below what a variant serves, it holds what has arrived, not what fits: the "
         "capacity aim is judged with all requests at once."))
  for row in rows:
    if row["path"] != "padded generate" or row["variant"] not in engine:
      continue
    served = engine[row["variant"]]
    notes.append(
        f"{row['variant']} engine / padded generate at the same budget: "
        f"{served['tokens_per_s'] / row['tokens_per_s']:,.2f}x the output tokens/s, "
        f"{served['held_mean'] / row['held_mean']:,.2f}x the sequences held on average, TTFT "
        f"p50 {row['ttft_p50'] / served['ttft_p50']:,.2f}x shorter.")
  bounds = collections.Counter(r["bound"] for r in rows if r["path"] == "engine")
  notes.append(
      "Roofline: max(bytes / bandwidth, FLOPs / matmul FLOP/s) for the run's work (module "
      "docstring of mla_jax/bench/serve.py); 'of roofline' = roofline time / measured time. "
      f"Ceiling that binds: {', '.join(f'{b} ({n} rows)' for b, n in bounds.items())}.")
  notes.append("Times exclude compilation (the engine compiles ahead: 'compile s'; padded "
               "generate compiles each new batch shape, left out of its clock). TTFT of padded "
               "generate is its batch's end (generate returns the batch whole); it has no ITL. "
               f"tokens/s: median of {args.repeats} runs (min, max), after one untimed warm-up "
               "run.")
  columns = (("variant", "attention"), ("path", "path"), ("cache_dtype", "cache"),
             ("bytes_per_token", "cache bytes / token"), ("held_mean", "held (mean)"),
             ("held_peak", "held (peak)"), ("preemptions", "preempted"),
             ("requests_per_s", "requests/s"), ("tokens_per_s", "output tokens/s"),
             ("tokens_per_s_min", "min"), ("tokens_per_s_max", "max"), ("vs_mha", "x MHA"),
             ("ttft_p50", "TTFT p50 s"), ("ttft_p99", "TTFT p99 s"),
             ("itl_p50", "ITL p50 s"), ("itl_p99", "ITL p99 s"),
             ("of_roofline", "of roofline"), ("bound", "bound"), ("compile_s", "compile s"))
  title = ("All requests at once" if arrival == "burst"
           else f"Poisson arrivals, {rate:,.3g} requests/s")
  return Table(f"{title}: {args.budget} cache budget", columns, rows, notes)


def _page_table(rows: list[dict], args) -> Table:
  notes = [f"{rows[0]['variant']} through the engine, all requests at once, at {args.budget}; "
           "one run each after a warm-up. Smaller pages waste fewer slots at a sequence's end "
           "(more held); larger ones walk fewer page-table entries per block."]
  columns = (("page_size", "page size"), ("num_pages", "pages"), ("held_mean", "held (mean)"),
             ("held_peak", "held (peak)"), ("preemptions", "preempted"),
             ("tokens_per_s", "output tokens/s"), ("ttft_p50", "TTFT p50 s"),
             ("itl_p50", "ITL p50 s"), ("of_roofline", "of roofline"), ("compile_s", "compile s"))
  return Table(f"Page size: {rows[0]['variant']}", columns, rows, notes)


def plot(rows: dict, args: argparse.Namespace, path: Path) -> None:
  import matplotlib.pyplot as plt

  arrivals = list(rows)
  fig, axes = plt.subplots(len(arrivals), 2, figsize=(11, 3.6 * len(arrivals)), squeeze=False)
  for (ax_rate, ax_held), arrival in zip(axes, arrivals):
    labels = [f"{r['variant']}\n{'padded' if r['path'] != 'engine' else 'engine'}"
              for r in rows[arrival]]
    colors = ["tab:red" if r["variant"].startswith("MLA") and r["path"] == "engine" else
              "tab:orange" if r["path"] != "engine" else "tab:gray" for r in rows[arrival]]
    ax_rate.bar(labels, [r["tokens_per_s"] for r in rows[arrival]], color=colors)
    ax_rate.set_ylabel("output tokens/s")
    ax_held.bar(labels, [r["held_mean"] for r in rows[arrival]], color=colors)
    ax_held.set_ylabel("sequences held (mean)")
    for ax in (ax_rate, ax_held):
      ax.tick_params(axis="x", labelsize=7)
      ax.set_title(f"{arrival}, cache budget {args.budget}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
