"""The `mla-jax` command line: `info` (sizes and cache bytes) and `train`.

Every subcommand takes an optional YAML config and dotted key=value overrides; without a config
the built-in defaults apply, which configs/tiny.yaml spells out (a test keeps them equal).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence

import mla_jax
from mla_jax.config import Config, ModelConfig, load_config


def count_params(config: ModelConfig) -> int:
  """Parameter count from shapes alone (jax.eval_shape): nothing is allocated, so DeepSeek-V3's
  preset is counted on a laptop."""
  import jax
  import jax.numpy as jnp

  model = mla_jax.Transformer(config)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(shapes))


def describe(config: ModelConfig) -> list[str]:
  """The lines `mla-jax info` prints: size, and what one token costs in the decode cache."""
  import jax.numpy as jnp

  itemsize = jnp.dtype(config.dtype).itemsize
  per_layer = config.cache_elements_per_token_per_layer()
  layers = config.num_layers
  if config.attention == "mla":
    shape = f"c_kv {config.kv_lora_rank} + k_rope {config.qk_rope_head_dim}"
  else:
    shape = (f"{config.kv_heads} kv heads x (k {config.qk_head_dim} + v {config.v_head_dim})")
  mha = dataclasses.replace(config, attention="mha", num_kv_heads=None)
  mha_per_layer = mha.cache_elements_per_token_per_layer()
  context_bytes = per_layer * layers * itemsize * config.max_seq_len
  return [
      f"attention: {config.attention}  ({config.num_layers} layers, {config.num_heads} heads, "
      f"hidden {config.hidden_size}, dtype {config.dtype})",
      f"parameters: {count_params(config):,}",
      f"kv cache per token per layer: {per_layer:,} elements ({shape}) = "
      f"{per_layer * itemsize:,} bytes",
      f"kv cache per token, all {layers} layers: {per_layer * layers:,} elements = "
      f"{per_layer * layers * itemsize:,} bytes",
      f"kv cache for one sequence of max_seq_len={config.max_seq_len:,}: "
      f"{context_bytes / 2**20:,.1f} MiB",
      f"vs MHA with the same heads ({mha_per_layer:,} elements per token per layer): "
      f"{per_layer / mha_per_layer:.2%} of its cache",
  ]


def _resolve_config(args: argparse.Namespace) -> Config:
  """CONFIG is optional: a first positional with '=' in it is already an override."""
  items = ([] if args.config is None else [args.config]) + list(args.overrides)
  if items and "=" not in items[0]:
    return load_config(items[0], *items[1:])
  return load_config(None, *items)


def _info(args: argparse.Namespace) -> int:
  config = _resolve_config(args)
  print(f"config: {args.config or '(built-in defaults = configs/tiny.yaml)'}")
  for line in describe(config.model):
    print(line)
  return 0


def _train(args: argparse.Namespace) -> int:
  from mla_jax.train import TrainingError, sample_text, train

  config = _resolve_config(args)
  try:
    summary = train(config)
  except TrainingError as err:
    print(f"mla-jax: error: {err}", file=sys.stderr)
    return 1
  if summary["interrupted"]:
    return 0
  if "val_loss" in summary:
    print(f"final: step {summary['final_step']}, train loss {summary['loss']:.4f}, "
          f"validation loss {summary['val_loss']:.4f} nats/token")
  tc = config.train
  if tc.sample_tokens:
    text = sample_text(config, summary["params"], tc.sample_prompt, tc.sample_tokens,
                       tc.sample_temperature, config.seed)
    print(f"sample (temperature {tc.sample_temperature}, seed {config.seed}):")
    print(text)
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="mla-jax", description="Multi-head Latent Attention for JAX: inspect, train, decode.")
  parser.add_argument("--version", action="version", version=f"mla-jax {mla_jax.__version__}")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND")
  info = commands.add_parser("info", help="parameter count and KV-cache bytes per token")
  info.set_defaults(run=_info)
  train = commands.add_parser(
      "train", help="train (or resume) a model; with no arguments, the tiny model on the "
      "Python standard library's sources")
  train.set_defaults(run=_train)
  for command in (info, train):
    command.add_argument("config", nargs="?", help="YAML config, e.g. configs/tiny.yaml")
    command.add_argument("overrides", nargs="*", metavar="key=value",
                         help="dotted overrides, e.g. model.kv_lora_rank=64 train.steps=200")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 2
  try:
    return args.run(args)
  except ValueError as err:  # bad config or input: one clear line, no traceback
    print(f"mla-jax: error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
