"""The `mla-jax` command line: `info` (sizes, memory, cache bytes), `train`, `generate`, `convert`.

`info` and `train` take an optional YAML config and dotted key=value overrides; without a config
the built-in defaults apply, which configs/tiny.yaml spells out (a test keeps them equal).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional, Sequence

import mla_jax
from mla_jax.config import CACHE_DTYPES, Config, ModelConfig, load_config


def abstract_params(config: ModelConfig):
  """Parameter shapes from jax.eval_shape: nothing is allocated, so DeepSeek-V3's preset is
  sized on a laptop."""
  import jax
  import jax.numpy as jnp

  model = mla_jax.Transformer(config)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)["params"]


def count_params(config: ModelConfig) -> int:
  import jax

  return sum(int(x.size) for x in jax.tree_util.tree_leaves(abstract_params(config)))


def _size(num_bytes: int) -> str:
  return f"{num_bytes / 2**30:,.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:,.1f} MiB"


def describe(config: ModelConfig) -> list[str]:
  """The lines `mla-jax info` prints: size, and what one token costs in the decode cache."""
  import jax
  import jax.numpy as jnp

  from mla_jax.sharding import bytes_per_device

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
  params = abstract_params(config)
  count = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
  one = bytes_per_device(params, {})
  fsdp8 = bytes_per_device(params, {"fsdp": 8})
  return [
      f"attention: {config.attention}  ({config.num_layers} layers, {config.num_heads} heads, "
      f"hidden {config.hidden_size}, dtype {config.dtype})",
      f"parameters: {count:,}",
      f"parameter memory ({config.param_dtype}): {_size(one)} on one device; "
      f"{_size(fsdp8)} per device with mesh.fsdp=8",
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


def _start_distributed(args: argparse.Namespace) -> None:
  """jax.distributed for multi-process runs; before any other JAX call. With --distributed alone,
  JAX finds the coordinator itself (TPU pods, SLURM); on CPUs the processes talk over gloo."""
  if not (args.distributed or args.coordinator):
    return
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args.coordinator:
    if args.num_processes is None or args.process_id is None:
      raise ValueError("--coordinator needs --num-processes and --process-id")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  else:
    jax.distributed.initialize()


def _train(args: argparse.Namespace) -> int:
  from mla_jax.train import TrainingError, sample_text, train

  config = _resolve_config(args)
  _start_distributed(args)
  try:
    summary = train(config)
  except TrainingError as err:
    print(f"mla-jax: error: {err}", file=sys.stderr)
    return 1
  if summary["interrupted"]:
    return 0
  if not summary["main_process"]:
    return 0
  if "val_loss" in summary:
    print(f"final: step {summary['final_step']}, train loss {summary['loss']:.4f}, "
          f"validation loss {summary['val_loss']:.4f} nats/token")
  tc = config.train
  if tc.sample_tokens and summary["multi_process"]:
    print("sample skipped: parameters are spread over several processes; run mla-jax generate")
  elif tc.sample_tokens:
    text = sample_text(config, summary["params"], tc.sample_prompt, tc.sample_tokens,
                       tc.sample_temperature, config.seed)
    print(f"sample (temperature {tc.sample_temperature}, seed {config.seed}):")
    print(text)
  return 0


def _generate(args: argparse.Namespace) -> int:
  from mla_jax.data import load_tokenizer
  from mla_jax.model import Transformer
  from mla_jax.sampling import cache_length, check_sampling
  from mla_jax.train import load_trained, read_workdir_config

  if (args.prompt is None) == (args.prompt_file is None):
    raise ValueError("give exactly one of --prompt TEXT or --prompt-file FILE")
  if args.prompt is not None:
    texts = [args.prompt]
  else:
    path = Path(args.prompt_file)
    if not path.is_file():
      raise ValueError(f"--prompt-file {args.prompt_file!r} does not exist")
    texts = [line for line in path.read_text().splitlines() if line.strip()]
    if not texts:
      raise ValueError(f"--prompt-file {args.prompt_file!r} holds no non-empty line")
  tokenizer = load_tokenizer(args.checkpoint)
  prompts = [tokenizer.encode(t) for t in texts]
  if any(not p for p in prompts):
    raise ValueError("--prompt is empty: give at least one character")
  options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, eos_id=tokenizer.EOS)
  model_config = read_workdir_config(args.checkpoint).model  # cheap: validate before loading
  check_sampling(model_config.vocab_size, **options)
  cache_length(max(len(p) for p in prompts), args.max_new_tokens, model_config.max_seq_len)
  if args.cache_dtype is not None:  # checked (e.g. int8 with a baseline) before loading weights
    model_config = dataclasses.replace(model_config, cache_dtype=args.cache_dtype)
  config, params = load_trained(args.checkpoint)
  model = Transformer(dataclasses.replace(config.model, cache_dtype=model_config.cache_dtype))
  if len(prompts) == 1:
    _stream_one(model, params, tokenizer, texts[0], prompts[0], options, args.seed)
  else:
    _generate_batch(model, params, tokenizer, prompts, options, args.seed)
  return 0


def _stream_one(model, params, tokenizer, text: str, prompt: list[int], options: dict,
                seed: int) -> None:
  """Prints the prompt, then the continuation as soon as each piece decodes to whole characters."""
  import time

  from mla_jax.sampling import stream

  start = time.perf_counter()
  tokens = stream(model, params, prompt, seed=seed, **options)  # validates and compiles
  compiled = time.perf_counter()
  sys.stdout.write(text)
  new, printed, first_at = [], "", None
  for token in tokens:
    first_at = first_at or time.perf_counter()
    new.append(token)
    decoded = tokenizer.decode(new)
    if not decoded.endswith("\ufffd"):  # wait for the rest of a multi-byte character
      sys.stdout.write(decoded[len(printed):])
      sys.stdout.flush()
      printed = decoded
  done = time.perf_counter()
  sys.stdout.write("\n")
  decoded = len(new) - 1  # the first new token comes out of the prefill
  print(f"compile: {compiled - start:.2f} s; prefill: {len(prompt)} tokens in "
        f"{first_at - compiled:.4f} s = {len(prompt) / (first_at - compiled):,.0f} tokens/s; "
        f"decode: {decoded} tokens in {done - first_at:.3f} s = "
        f"{decoded / max(done - first_at, 1e-9):,.1f} tokens/s", file=sys.stderr)


def _generate_batch(model, params, tokenizer, prompts: list[list[int]], options: dict,
                    seed: int) -> None:
  """One compiled loop for the whole batch; prints each row when all are done."""
  import time

  from mla_jax.sampling import generate

  start = time.perf_counter()
  out, lengths = generate(model, params, prompts, seed=seed, pad_id=tokenizer.PAD,
                          return_lengths=True, **options)
  elapsed = time.perf_counter() - start
  for row, length in zip(out, lengths):
    print(tokenizer.decode(row[:length]))
    print("---")
  prompt_tokens = sum(len(p) for p in prompts)
  new = int(lengths.sum()) - prompt_tokens
  print(f"{len(prompts)} prompts ({prompt_tokens} tokens) + {new} new tokens in {elapsed:.2f} s, "
        f"compilation included = {new / elapsed:,.1f} new tokens/s", file=sys.stderr)


def _convert(args: argparse.Namespace) -> int:
  from mla_jax.hf import convert_hf

  out = convert_hf(args.from_hf, args.out, dtype=args.dtype)
  print(f"wrote {out}: run `mla-jax generate --checkpoint {out} --prompt ...`")
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
  multi = train.add_argument_group("multi-process (one command per process or host)")
  multi.add_argument("--distributed", action="store_true",
                     help="call jax.distributed.initialize() and let JAX find the coordinator")
  multi.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
  multi.add_argument("--num-processes", type=int)
  multi.add_argument("--process-id", type=int)
  gen = commands.add_parser("generate", help="continue prompts with a model from `mla-jax train`")
  gen.add_argument("--checkpoint", required=True, metavar="WORKDIR",
                   help="a training workdir (its latest checkpoint is used)")
  gen.add_argument("--prompt", help="prompt text (streamed continuation)")
  gen.add_argument("--prompt-file", help="one prompt per line, generated as one batch")
  gen.add_argument("--max-new-tokens", type=int, default=200)
  gen.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
  gen.add_argument("--top-k", type=int, default=None)
  gen.add_argument("--top-p", type=float, default=None)
  gen.add_argument("--seed", type=int, default=0)
  gen.add_argument("--cache-dtype", choices=CACHE_DTYPES, default=None,
                   help="decode cache storage (default: model.cache_dtype, else model.dtype); "
                        "int8/int4 quantize MLA's latent")
  gen.set_defaults(run=_generate)
  convert = commands.add_parser("convert", help="a Hugging Face DeepseekV2/V3 directory -> workdir")
  convert.add_argument("--from-hf", required=True, metavar="DIR",
                       help="local directory with config.json and *.safetensors")
  convert.add_argument("--out", required=True, metavar="WORKDIR")
  convert.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  convert.set_defaults(run=_convert)
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
