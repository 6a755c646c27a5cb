"""The `mla-jax` command line: `mla-jax --version`, `mla-jax info CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence

import mla_jax
from mla_jax.config import ModelConfig, load_config


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


def _info(args: argparse.Namespace) -> int:
  config = load_config(args.config, *args.overrides)
  print(f"config: {args.config}")
  for line in describe(config.model):
    print(line)
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="mla-jax", description="Multi-head Latent Attention for JAX: inspect, train, decode.")
  parser.add_argument("--version", action="version", version=f"mla-jax {mla_jax.__version__}")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND")
  info = commands.add_parser("info", help="parameter count and KV-cache bytes per token")
  info.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
  info.add_argument("overrides", nargs="*", metavar="key=value",
                    help="dotted overrides, e.g. model.kv_lora_rank=64")
  info.set_defaults(run=_info)
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
