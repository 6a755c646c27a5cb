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


def add_bench_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
  """Adds `bench SUITE [--quick] [--out DIR] [suite options]` to the CLI's subcommands."""
  bench = commands.add_parser("bench", help="measure the paper's claims: " + ", ".join(SUITES))
  suites = bench.add_subparsers(dest="suite", metavar="SUITE", required=True)
  for name, help_text in SUITES.items():
    parser = suites.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes that run in seconds (the tests use this)")
    parser.add_argument("--out", default="bench_results", metavar="DIR",
                        help="where SUITE.md, SUITE.json and SUITE.png go (default: %(default)s)")
    importlib.import_module(f"mla_jax.bench.{name}").add_arguments(parser)
    parser.set_defaults(bench_parser=parser)
  return bench


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
  suite = importlib.import_module(f"mla_jax.bench.{args.suite}")
  if hasattr(suite, "resolve_defaults"):
    suite.resolve_defaults(args)  # --quick and backend-dependent defaults, before printing
  args.command = command_line(args.bench_parser, args)
  report = suite.run(args)
  print(report.markdown())
  for path in report.write(Path(args.out)):
    print(f"wrote {path}")
  return 0
