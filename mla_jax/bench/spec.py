"""`mla-jax bench spec`: self-speculative decoding with a model's own MTP module
(mla_jax/speculative.py) against plain decoding, next to the DeepSeek-V3 report's figures for
its MTP module used as a draft: 85-90% of the second tokens accepted, 1.8x the tokens/s.

The model is a run of `mla-jax train` with model.num_mtp_layers >= 1: by default the workdir
configs/tiny_mtp.yaml trains into (`mla-jax train configs/tiny_mtp.yaml` first), or
--checkpoint WORKDIR. Prompts are --prompt-len tokens cut at seeded offsets from the validation
split of the run's own training data (the standard library's sources by default), so the model
continues text of the kind it learned without having trained on those files.

For each batch size and each k, the same prompts are continued by --tokens new tokens with
`generate` (greedy unless --temperature) plainly and with speculative=k: new tokens/s (median of
--repeats runs after a first, compiling one; prefill of the prompts included in both), the
speed-up over plain decoding at the same batch, the share of drafts kept per draft position, and
tokens per verify step. Greedy runs are checked token for token against plain greedy. Each
verify step (one T = k+1 step over the cache) is judged against the roofline measured in the
same run: its bytes (every weight once, the cache's filled slots) over the measured bandwidth.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

from mla_jax.bench import add_quick_option
from mla_jax.bench.common import (Report, Table, display_path, header_lines, measure_ceilings,
                                  parse_ints, progress, quick_ceilings, time_calls)
from mla_jax.config.loader import load_config
from mla_jax.kinds import cache_bytes_per_token
from mla_jax.sampling import generate

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
REPORT_ACCEPTANCE = (0.85, 0.90)  # DeepSeek-V3 report, section 5.4.3: second-token acceptance
REPORT_SPEEDUP = 1.8  # its tokens/s with the MTP module drafting, over without


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--checkpoint", default=None, metavar="WORKDIR",
                      help="a workdir of `mla-jax train` with model.num_mtp_layers >= 1 "
                           "(default: the one configs/tiny_mtp.yaml trains into; with --quick "
                           "and none given, an untrained 1-layer tiny_mtp model)")
  add_quick_option(parser, "--batch", full="1,8", quick="1,2",
                   help="comma-separated batch sizes")
  add_quick_option(parser, "--k", full="1,2,3", quick="1,2",
                   help="comma-separated draft lengths (tokens the MTP module drafts per step)")
  add_quick_option(parser, "--tokens", full=128, quick=12, type=int,
                   help="new tokens per prompt")
  add_quick_option(parser, "--prompt-len", full=64, quick=8, type=int,
                   help="prompt tokens, cut from the validation text")
  add_quick_option(parser, "--repeats", full=5, quick=1, type=int, help="timed runs")
  parser.add_argument("--temperature", type=float, default=0.0,
                      help="0 for greedy (checked against plain greedy, default), else sampled "
                           "with the speculative sampling rule")
  parser.add_argument("--seed", type=int, default=0, help="prompt offsets and sampling")


def default_checkpoint() -> Path:
  """The workdir `mla-jax train configs/tiny_mtp.yaml` writes (runs/tiny_mtp-<run id>)."""
  return Path(load_config(str(CONFIGS / "tiny_mtp.yaml")).with_default_workdir(
      "tiny_mtp").workdir)


def load_model(args: argparse.Namespace):
  """(Transformer, params, data config, where it came from). Raises ValueError for a workdir
  that does not exist (naming the command that makes it) or a model without an MTP module."""
  from mla_jax.model import Transformer
  from mla_jax.runs import load_run
  from mla_jax.speculative import check_speculative

  if args.checkpoint is None and args.quick:  # prompts from this package's own sources
    package = Path(__file__).resolve().parents[1]
    config = load_config(str(CONFIGS / "tiny_mtp.yaml"), "model.num_layers=1",
                         f"data.path={package}")
    model = Transformer(config.model)
    params = model.init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    return model, params, config.data, "untrained 1-layer configs/tiny_mtp.yaml model (--quick)"
  workdir = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
  if not workdir.exists():
    raise ValueError(f"{workdir} does not exist: train the model first with `mla-jax train "
                     f"{display_path(CONFIGS / 'tiny_mtp.yaml')}`, or give --checkpoint WORKDIR")
  run = load_run(workdir)
  check_speculative(run.config.model, 1)
  return run.model, run.params, run.config.data, f"{workdir} (step {run.step})"


def prompts_from(data, batch: int, length: int, seed: int) -> np.ndarray:
  """batch prompts of `length` tokens from the validation split, at seeded offsets: [B,T]."""
  from mla_jax.train.data import load_corpus

  val = np.asarray(load_corpus(data, min_tokens=length + 1).val)
  starts = np.random.default_rng(seed).integers(0, len(val) - length, batch)
  return np.stack([val[s:s + length] for s in starts]).astype(np.int32)


def measure(model, params, prompts: np.ndarray, args, k: int) -> dict:
  """One row: generate's new tokens/s for these prompts, plain (k = 0) or speculative."""
  options = dict(max_new_tokens=args.tokens, temperature=args.temperature, seed=args.seed,
                 lengths=[prompts.shape[1]] * len(prompts))
  if k:
    options.update(speculative=k, return_stats=True)
  result = {}

  def call():
    result["out"] = generate(model, params, prompts, **options)
    return result["out"][0] if k else result["out"]

  timing = time_calls(call, args.repeats)
  batch = len(prompts)
  row = {"batch": batch, "k": k, "tokens_per_s": batch * args.tokens / timing.median_s,
         "min_tokens_per_s": batch * args.tokens / timing.max_s,
         "max_tokens_per_s": batch * args.tokens / timing.min_s,
         "seconds": timing.median_s, "compile_s": timing.compile_s}
  if k:
    out, stats = result["out"]
    row.update(acceptance=[float(a) for a in stats.acceptance],
               tokens_per_step=stats.tokens_per_round, steps=stats.rounds, tokens=out)
  else:
    row.update(tokens=result["out"], steps=args.tokens - 1)
  return row


def verify_step_roofline(model, params, rows: list[dict], ceilings, prompt_len: int,
                         tokens: int) -> None:
  """Adds to each row the mean time of one decode or verify step and the roofline's: every
  weight read once per step plus the cache's filled slots (the mean over the run), both
  models' caches for a speculative step."""
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
  per_token = cache_bytes_per_token(model.config)
  mtp_per_token = per_token // model.config.num_layers
  for row in rows:
    held = prompt_len + tokens / 2  # mean slots held per row over the run
    cache = row["batch"] * held * (per_token + (mtp_per_token if row["k"] else 0))
    roofline, bound = ceilings.roofline_s(weight_bytes + cache, 0.0)
    row["step_ms"] = row["seconds"] / max(row["steps"], 1) * 1e3
    row["roofline_ms"] = roofline * 1e3
    row["bound"] = bound


def run(args: argparse.Namespace) -> Report:
  batches = parse_ints(args.batch, "--batch")
  ks = parse_ints(args.k, "--k")
  for name in ("tokens", "prompt_len", "repeats"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: must be "
                       ">= 1")
  if args.temperature < 0:
    raise ValueError(f"--temperature {args.temperature} is invalid: must be >= 0 (0 = greedy)")
  model, params, data, source = load_model(args)
  if args.prompt_len + args.tokens > model.config.max_seq_len:
    raise ValueError(f"--prompt-len {args.prompt_len} + --tokens {args.tokens} exceeds the "
                     f"model's max_seq_len ({model.config.max_seq_len})")
  progress("measuring the machine's ceilings")
  ceilings = quick_ceilings("float32") if args.quick else measure_ceilings("float32",
                                                                          matmul_n=1024)
  rows = []
  for batch in batches:
    prompts = prompts_from(data, batch, args.prompt_len, args.seed)
    plain = None
    for k in [0] + ks:
      progress(f"batch {batch}, {'plain decoding' if k == 0 else f'k = {k}'}: "
               f"{args.tokens} new tokens ({args.repeats} timed runs)")
      row = measure(model, params, prompts, args, k)
      if k == 0:
        plain = row
      row["speedup"] = row["tokens_per_s"] / plain["tokens_per_s"]
      if k and args.temperature == 0:
        row["identical"] = bool(np.array_equal(row["tokens"], plain["tokens"]))
        if not row["identical"]:
          raise RuntimeError(f"greedy speculative decoding (k = {k}, batch {batch}) gave other "
                             "tokens than plain greedy decoding: a bug, please report it")
      rows.append(row)
  verify_step_roofline(model, params, rows, ceilings, args.prompt_len, args.tokens)
  plain_step_ms = {row["batch"]: row["step_ms"] for row in rows if row["k"] == 0}
  for row in rows:
    row["break_even"] = row["step_ms"] / plain_step_ms[row["batch"]] if row["k"] else "-"
    del row["tokens"]
    acceptance = row.get("acceptance")
    row["kept"] = "-" if acceptance is None else " / ".join(
        "-" if np.isnan(a) else f"{a:.1%}" for a in acceptance)
    row["label"] = "plain" if row["k"] == 0 else f"k = {row['k']}"
  return Report("spec", header_lines(model.config.dtype, args.command) + [f"model: {source}"]
                + ceilings.lines(), [_table(rows, args)], plot=lambda png: plot(rows, png))


def _table(rows: list[dict], args: argparse.Namespace) -> Table:
  best = {}  # per batch, the speculative row with the highest speed-up
  for row in rows:
    if row["k"] and (row["batch"] not in best or row["speedup"] > best[row["batch"]]["speedup"]):
      best[row["batch"]] = row
  first = [r["acceptance"][0] for r in rows if r["k"] == 1]
  decoding = "greedy" if args.temperature == 0 else f"sampled at temperature {args.temperature}"
  notes = [
      f"{args.prompt_len}-token prompts from the validation text, {args.tokens} new tokens "
      f"each, {decoding}; tokens/s = batch x new tokens / the median run of generate (prefill "
      "included), min..max over the runs; speed-up = over plain decoding at the same batch.",
      "kept = the share of drafts kept at each draft position, of those verified with every "
      "draft before them kept; tokens/step = tokens a row commits per verify step (kept + 1).",
      "DeepSeek-V3 report (section 5.4.3): " + f"{REPORT_ACCEPTANCE[0]:.0%}-"
      f"{REPORT_ACCEPTANCE[1]:.0%} of second tokens accepted, {REPORT_SPEEDUP}x tokens/s, "
      "one MTP module drafting one token for a 61-layer model, where the draft costs under 2% "
      "of a step; here, the best speed-up: " + ", ".join(
          f"batch {b}: {r['speedup']:.2f}x (k = {r['k']})" for b, r in best.items())
      + (f"; first draft kept {first[0]:.1%} (k = 1, batch {rows[0]['batch']})" if first else "")
      + ".",
      "step ms = seconds / verify (or decode) steps; roofline = every weight and the filled cache "
      "read once per step at the measured bandwidth.",
      "break-even = step ms / plain decoding's step ms at the same batch: the tokens a verify "
      "step must commit for speculative decoding to match plain decoding's tokens/s (at most "
      "k + 1 can be); speculation pays where tokens/step exceeds it."]
  if args.temperature == 0:
    notes.append("identical = the speculative run's tokens equal plain greedy's (checked).")
  columns = (("batch", "batch"), ("label", "decoding"), ("tokens_per_s", "new tokens/s (median)"),
             ("min_tokens_per_s", "min"), ("max_tokens_per_s", "max"), ("speedup", "speed-up"),
             ("kept", "kept per draft position"), ("tokens_per_step", "tokens/step"),
             ("steps", "steps"), ("step_ms", "step ms"), ("break_even", "break-even tokens/step"),
             ("roofline_ms", "roofline ms"),
             ("compile_s", "compile s"))
  if args.temperature == 0:
    columns += (("identical", "identical"),)
  return Table("Self-speculative decoding with the MTP module", columns, rows, notes,
               formats={"speedup": "{:.2f}x"})


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4))
  for batch in sorted({r["batch"] for r in rows}):
    mine = [r for r in rows if r["batch"] == batch]
    ax.plot([r["k"] for r in mine], [r["tokens_per_s"] for r in mine], "o-",
            label=f"batch {batch}")
  ax.set_xlabel("tokens drafted per verify step (0 = plain decoding)")
  ax.set_ylabel("new tokens/s (median)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
