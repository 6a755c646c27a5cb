"""`mla-jax bench SUITE`: measure the DeepSeek-V2 paper's claims in this code, on this machine.

Suites (one module each): memory (KV cache per token), decode (one decode step against the
roofline), throughput (tokens/s at a fixed cache memory budget), compute (FLOPs per token from
XLA's cost analysis), train (training tokens/s), quality (validation loss at equal parameters),
serve (the serving engine on a synthetic workload at a fixed cache budget), peers (mla-jax
against transformers' DeepseekV2 on one checkpoint) and spec (self-speculative decoding with a
model's MTP module, DeepSeek-V3's draft model).
Each prints a Markdown table headed by the machine, device kind, JAX version, dtype and the full
command that reproduces it, and writes SUITE.md, SUITE.json (raw rows) and SUITE.png into --out:
bench_results/ by default, bench_results/quick/ with --quick (listed in .gitignore, so a quick
run never replaces the committed figures; an --out inside the repository's bench_results/ other
than quick/ is refused with --quick). While it runs, a suite reports each variant and size it
measures on stderr, with the seconds elapsed (common.progress).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
from pathlib import Path
from typing import Any, Optional

SUITES = {
    "memory": "KV-cache elements and bytes per token (paper Table 1), from init_cache's shapes",
    "decode": "one decode step (the step generate uses) against context length and the roofline",
    "throughput": "generated tokens/s of each attention with the largest batch a cache budget fits",
    "compute": "FLOPs per token (XLA cost analysis): training, prefill, naive and absorbed decode",
    "train": "training step time and tokens/s at equal parameter count",
    "quality": "validation loss and perplexity at equal parameters, data and tokens",
    "serve": "the serving engine at a fixed cache budget: tokens/s, latency, sequences held",
    "peers": "prefill and a training step against transformers' DeepseekV2 on one checkpoint",
    "spec": "self-speculative decoding with the MTP module: drafts kept, tokens/s against plain",
}

OUT = Path("bench_results")  # relative to the working directory, as --out is
QUICK_OUT = OUT / "quick"  # .gitignore lists it
COMMITTED = Path(__file__).resolve().parents[2] / "bench_results"  # in a source checkout


def add_quick_option(parser: argparse.ArgumentParser, flag: str, *, full: Any, quick: Any,
                     help: str, shown: Optional[str] = None, **kwargs) -> argparse.Action:
  """An option whose default depends on --quick: `full` normally, `quick` with --quick (both
  already of the option's type; full None leaves it to the suite). --help prints both as one
  default, "(default: FULL, with --quick: QUICK)" (`shown` replaces FULL's text), and
  parse_suite_args fills in the right one when the option is not given."""
  action = parser.add_argument(flag, default=None, help=help, **kwargs)
  action.quick_defaults = (full, quick)
  action.default_help = f"{full if shown is None else shown}, with --quick: {quick}"
  return action


def fill_quick_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Sets every add_quick_option option left unset (None) to its default for args.quick.
  `is None`, not falsiness: an explicit 0 or '' still reaches the suite's own checks."""
  for action in parser._actions:  # argparse has no public accessor for a parser's options
    defaults = getattr(action, "quick_defaults", None)
    if defaults is not None and getattr(args, action.dest) is None:
      setattr(args, action.dest, defaults[1] if args.quick else defaults[0])


def output_dir(args: argparse.Namespace) -> Path:
  """Where the suite's files go: --out when given, else bench_results/ (full sizes) or
  bench_results/quick/ (--quick), both relative to the working directory.

  Raises ValueError for --quick with an --out that is the repository's committed
  bench_results/ or a folder in it other than quick/: tiny sizes must not replace the figures
  the docs quote."""
  if args.out is None:
    return QUICK_OUT if args.quick else OUT
  out = Path(args.out)
  if args.quick:
    resolved = out.expanduser().resolve()
    inside = resolved == COMMITTED or COMMITTED in resolved.parents
    quick = COMMITTED / QUICK_OUT.name
    if inside and not (resolved == quick or quick in resolved.parents):
      raise ValueError(f"--out {args.out!r} is inside the committed bench_results/, which --quick "
                       f"must not overwrite: leave --out out (quick runs write {QUICK_OUT}/, "
                       "which git ignores) or give a directory elsewhere")
  return out


def add_bench_parser(commands: argparse._SubParsersAction,
                     formatter_class=argparse.HelpFormatter) -> argparse.ArgumentParser:
  """Adds `bench SUITE [--quick] [--out DIR] [suite options]` to the CLI's subcommands.

  The suite's own options are parsed by suite_parser when the command runs, so building the CLI
  imports no suite (and no JAX): `mla-jax --help` stays instant and JAX is imported only after
  the CLI has installed its signal handlers. `mla-jax bench SUITE --help` lists them."""
  listing = "\n".join(f"  {name:<11} {text}" for name, text in SUITES.items())
  bench = commands.add_parser(
      "bench", help="measure the paper's claims: " + ", ".join(SUITES),
      description="Measure a claim of the DeepSeek-V2 paper in this code, on this machine.",
      epilog=f"suites:\n{listing}\n\nOptions of a suite: mla-jax bench SUITE --help",
      formatter_class=formatter_class)
  bench.add_argument("suite", choices=list(SUITES), metavar="SUITE",
                     help=f"one of {', '.join(SUITES)}")
  bench.add_argument("suite_args", nargs=argparse.REMAINDER, metavar="...",
                     help="--quick, --out DIR and the suite's own options")
  return bench


def suite_parser(name: str) -> argparse.ArgumentParser:
  """The options of `mla-jax bench NAME` (imports that suite's module, and with it JAX)."""
  from mla_jax.help_format import ArgumentParser, HelpFormatter

  parser = ArgumentParser(prog=f"mla-jax bench {name}", description=SUITES[name],
                                   formatter_class=HelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes (the tests use this): seconds to a few minutes on a 2-core "
                           "CPU, docs/results.md")
  parser.add_argument("--out", default=None, metavar="DIR",
                      help=f"where SUITE.md, SUITE.json and SUITE.png go (default: {OUT}, with "
                           f"--quick: {QUICK_OUT}, which git ignores; --quick refuses the "
                           "committed bench_results/)")
  importlib.import_module(f"mla_jax.bench.{name}").add_arguments(parser)
  return parser


def parse_suite_args(name: str, argv: list[str]) -> argparse.Namespace:
  """`mla-jax bench NAME ARGV...` -> the suite's namespace, with .suite and .bench_parser set
  and the defaults that depend on --quick filled in."""
  parser = suite_parser(name)
  args = parser.parse_args(argv)
  fill_quick_defaults(parser, args)
  args.suite, args.bench_parser = name, parser
  return args


def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
  """The full `mla-jax bench SUITE ...` command, every option spelled out (defaults included),
  so a table states exactly how to reproduce it."""
  parts = ["mla-jax", "bench", args.suite]
  for action in parser._actions:  # argparse has no public accessor for a parser's options
    if not action.option_strings or action.dest in ("help", "out"):
      continue
    value = getattr(args, action.dest)
    flag = action.option_strings[-1]
    if isinstance(action, argparse._StoreTrueAction):
      parts += [flag] if value else []
    elif value is not None:
      parts += [flag, str(value)]
  return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
  """Runs one suite, prints its Markdown and writes its files; returns the exit status."""
  if not hasattr(args, "bench_parser"):  # from the CLI: the suite's options are still unparsed
    args = parse_suite_args(args.suite, args.suite_args)
  out = output_dir(args)  # refused before any work
  suite = importlib.import_module(f"mla_jax.bench.{args.suite}")
  if hasattr(suite, "resolve_defaults"):
    suite.resolve_defaults(args)  # backend-dependent defaults, before printing
  args.command = command_line(args.bench_parser, args)
  from mla_jax.bench.common import progress

  progress.restart(args.suite)
  report = suite.run(args)
  progress("done; writing " + str(out))
  print(report.markdown())
  for path in report.write(out):
    print(f"wrote {path}")
  return 0
