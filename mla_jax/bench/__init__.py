"""`mla-jax bench SUITE`: measure the DeepSeek-V2 paper's claims in this code, on this machine.

Suites (one module each): memory (KV cache per token), decode (one decode step against the
roofline), throughput (tokens/s at a fixed cache memory budget), compute (FLOPs per token from
XLA's cost analysis), train (training tokens/s) and quality (validation loss at equal parameters).
Each prints a Markdown table headed by the machine, device kind, JAX version, dtype and the full
command that reproduces it, and writes SUITE.md, SUITE.json (raw rows) and SUITE.png into --out.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
from pathlib import Path

SUITES = {
    "memory": "KV-cache elements and bytes per token (paper Table 1), from init_cache's shapes",
    "decode": "one decode step (the step generate uses) against context length and the roofline",
    "throughput": "generated tokens/s of each attention with the largest batch a cache budget fits",
    "compute": "FLOPs per token (XLA cost analysis): training, prefill, naive and absorbed decode",
    "train": "training step time and tokens/s at equal parameter count",
    "quality": "validation loss and perplexity at equal parameters, data and tokens",
}


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
  parser = argparse.ArgumentParser(prog=f"mla-jax bench {name}", description=SUITES[name],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes that run in seconds (the tests use this)")
  parser.add_argument("--out", default="bench_results", metavar="DIR",
                      help="where SUITE.md, SUITE.json and SUITE.png go")
  importlib.import_module(f"mla_jax.bench.{name}").add_arguments(parser)
  return parser


def parse_suite_args(name: str, argv: list[str]) -> argparse.Namespace:
  """`mla-jax bench NAME ARGV...` -> the suite's namespace, with .suite and .bench_parser set."""
  parser = suite_parser(name)
  args = parser.parse_args(argv)
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
  suite = importlib.import_module(f"mla_jax.bench.{args.suite}")
  if hasattr(suite, "resolve_defaults"):
    suite.resolve_defaults(args)  # --quick and backend-dependent defaults, before printing
  args.command = command_line(args.bench_parser, args)
  report = suite.run(args)
  print(report.markdown())
  for path in report.write(Path(args.out)):
    print(f"wrote {path}")
  return 0
