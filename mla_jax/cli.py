"""The `mla-jax` command line: `info` (sizes, memory, cache bytes), `train`, `generate`, `convert`,
`export` (mla_jax/hf/export.py), `convert-to-mla` (mla_jax/conversion/), `serve` (mla_jax/serving/server.py: an OpenAI-compatible HTTP server), `bench`
(mla_jax/bench/: measurements of the paper's claims).

`info` and `train` take an optional YAML config (a path, or a preset name such as deepseek_v2:
the configs/ shipped with the package) and dotted key=value overrides; without a config the
built-in defaults apply, which configs/tiny.yaml spells out (a test keeps them equal).

Each subcommand is one function `_<name>(args) -> exit status`, registered in build_parser.
User errors are ValueError, printed by main as one line `mla-jax: error: ...` with status 2; a
signal ends the command with 128 + its number (130 for Ctrl-C, 143 for SIGTERM), see
mla_jax/interrupts.py. JAX is imported by the subcommands, after the signal handlers are set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import mla_jax
from mla_jax.help_format import ArgumentParser, HelpFormatter
from mla_jax.config.loader import load_config_args, presets
from mla_jax.config.model import CACHE_DTYPES, ModelConfig
from mla_jax.config.run import Config
from mla_jax.interrupts import INTERRUPTS, exit_code


def abstract_params(config: ModelConfig):
  """Parameter shapes from jax.eval_shape: nothing is allocated, so DeepSeek-V3's preset is
  sized on a laptop."""
  from mla_jax.model import parameter_shapes

  return parameter_shapes(config)


def count_params(config: ModelConfig) -> int:
  import jax

  return sum(int(x.size) for x in jax.tree_util.tree_leaves(abstract_params(config)))


def _size(num_bytes: int) -> str:
  return f"{num_bytes / 2**30:,.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:,.1f} MiB"


def mha_with_the_same_heads(config: ModelConfig) -> ModelConfig:
  """The MHA baseline a model's cache is compared with: its heads and widths, every head its own
  key and value (one RoPE key group, float cache)."""
  return dataclasses.replace(config, attention="mha", num_kv_heads=None, cache_dtype=None,
                             qk_rope_groups=1)


def describe(config: ModelConfig) -> list[str]:
  """The lines `mla-jax info` prints: size, and what one token costs in the decode cache."""
  import jax

  from mla_jax.kinds import attention_kind, cache_bytes_per_token
  from mla_jax.sharding import bytes_per_device

  per_layer = config.cache_elements_per_token_per_layer()
  layers = config.num_layers
  # Bytes as the cache stores them (model.cache_dtype, else model.dtype; int8/int4 with scales).
  token_bytes = cache_bytes_per_token(config)
  shape = attention_kind(config).describe_cache(config)
  mha = mha_with_the_same_heads(config)
  mha_per_layer = mha.cache_elements_per_token_per_layer()
  context_bytes = token_bytes * config.max_seq_len
  params = abstract_params(config)
  count = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
  one = bytes_per_device(params, {})
  fsdp8 = bytes_per_device(params, {"fsdp": 8})
  return [
      f"attention: {config.attention}  ({config.num_layers} layers, {config.num_heads} heads, "
      f"hidden {config.hidden_size}, dtype {config.dtype})",
      f"parameters: {count:,}" + ("" if not config.num_mtp_layers else
                                  f" (of which {_mtp_count(params):,} in {config.num_mtp_layers} "
                                  "multi-token-prediction module(s))"),
      f"parameter memory ({config.param_dtype}): {_size(one)} on one device; "
      f"{_size(fsdp8)} per device with mesh.fsdp=8",
      f"kv cache per token per layer: {per_layer:,} elements ({shape}) = "
      f"{token_bytes // layers:,} bytes",
      f"kv cache per token, all {layers} layers: {per_layer * layers:,} elements = "
      f"{token_bytes:,} bytes",
      f"kv cache for one sequence of max_seq_len={config.max_seq_len:,}: "
      f"{context_bytes / 2**20:,.1f} MiB",
      f"vs MHA with the same heads ({mha_per_layer:,} elements per token per layer): "
      f"{per_layer / mha_per_layer:.2%} of its cache",
  ]


def _mtp_count(params) -> int:
  """Parameters of the MTP modules (mtp_layers_*) in a parameter tree of shapes."""
  import jax

  return sum(int(x.size) for name, tree in params.items() if name.startswith("mtp_layers_")
             for x in jax.tree_util.tree_leaves(tree))


def cache_width_warning(config: ModelConfig) -> Optional[str]:
  """A warning line when MLA's cached latent (kv_lora_rank + qk_rope_head_dim per token per layer)
  is wider than what MHA with the same heads caches (K and V of every head): the cache MLA exists
  to shrink is then larger than the baseline's. None when it is not (or attention is not MLA)."""
  if config.attention != "mla":
    return None
  latent = config.cache_elements_per_token_per_layer()
  mha = mha_with_the_same_heads(config)
  kv = mha.cache_elements_per_token_per_layer()
  if latent <= kv:
    return None
  return (f"mla-jax: warning: model.kv_lora_rank + model.qk_rope_head_dim = {config.kv_lora_rank} "
          f"+ {config.qk_rope_head_dim} = {latent:,} elements per token per layer is wider than "
          f"MHA's cache with the same heads ({config.num_heads} heads x (k {config.qk_head_dim} + "
          f"v {config.v_head_dim}) = {kv:,}): the MLA cache is then larger than MHA's, by "
          f"{latent - kv:,} elements per token per layer ({latent / kv:.2f}x its size); lower "
          f"model.kv_lora_rank below {kv - config.qk_rope_head_dim:,} for a smaller one")


def _warn_cache_width(config: ModelConfig) -> None:
  warning = cache_width_warning(config)
  if warning:
    print(warning, file=sys.stderr)


def _resolve_config(args: argparse.Namespace) -> Config:
  """CONFIG is optional: a first positional with '=' in it is already an override."""
  return load_config_args(([] if args.config is None else [args.config]) + list(args.overrides))


def _info(args: argparse.Namespace) -> int:
  config = _resolve_config(args)
  _warn_cache_width(config.model)
  named = args.config is not None and "=" not in args.config
  print(f"config: {args.config if named else '(built-in defaults = configs/tiny.yaml)'}")
  for line in describe(config.model):
    print(line)
  from mla_jax.train.memory import attention_memory_lines

  for line in attention_memory_lines(config):
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


def _init_from_config(args: argparse.Namespace) -> Config:
  """`train --init-from WORKDIR`: the config is the workdir's own config.yaml unless CONFIG is
  given, in a new workdir runs/<its name>-ft-<run id> unless workdir= is."""
  from mla_jax.config.loader import load_config
  from mla_jax.workdir import config_path

  start = Path(args.init_from)
  overrides = list(args.overrides) + [f"train.init_from={args.init_from}"]
  if args.config is not None and "=" in args.config:
    overrides.insert(0, args.config)
  elif args.config is not None:
    return load_config(args.config, *overrides)
  if not config_path(start).is_file():
    raise ValueError(f"--init-from {args.init_from!r} is not a workdir: no config.yaml")
  config = load_config(config_path(start), *overrides)
  if any(o.startswith("workdir=") for o in overrides):
    return config
  return dataclasses.replace(config, workdir=None).with_default_workdir(
      f"{start.resolve().name}-ft")


def _train(args: argparse.Namespace) -> int:
  from mla_jax.config.loader import DEFAULT_NAME
  from mla_jax.train.checks import check_inputs

  config = (_init_from_config(args) if args.init_from is not None
            else _resolve_config(args)).with_default_workdir(DEFAULT_NAME)
  _warn_cache_width(config.model)
  if args.print_config:  # nothing is trained, no workdir is made, JAX is not imported
    import yaml

    sys.stdout.write(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return 0
  check_inputs(config)  # before JAX is imported: a mistake costs what `mla-jax info` costs
  from mla_jax.train.loop import TrainingError, sample_text, train

  _start_distributed(args)
  try:
    summary = train(config)
  except TrainingError as err:
    print(f"mla-jax: error: {err}", file=sys.stderr)
    return 1
  if summary["already_complete"]:
    if summary["main_process"]:
      print(f"workdir {summary['workdir']}: already complete at step {summary['final_step']} "
            f"(train.steps={config.train.steps}); nothing to do. Sample it with `mla-jax "
            f"generate --checkpoint {summary['workdir']} --prompt TEXT`; a longer run is a new "
            "run: give train.steps=N (with workdir= unset it gets its own directory)")
    return 0
  if summary["interrupted"]:
    return exit_code(summary["interrupted"])
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
  from mla_jax.model import Transformer
  from mla_jax.sampling import cache_length, check_sampling
  from mla_jax.tokenizers import eos_id, find_tokenizer
  from mla_jax.runs import load_run
  from mla_jax.workdir import read_workdir_config

  if [args.prompt, args.prompt_file, args.prompt_ids].count(None) != 2:
    raise ValueError("give exactly one of --prompt TEXT, --prompt-file FILE or --prompt-ids IDS")
  texts = None
  if args.prompt is not None:
    texts = [args.prompt]
  elif args.prompt_file is not None:
    texts = _read_prompt_file(args.prompt_file)
  model_config = read_workdir_config(args.checkpoint).model  # cheap: validate before loading
  tokenizer, missing = find_tokenizer(args.checkpoint, model_config.vocab_size)
  if texts is None:
    prompts = [parse_prompt_ids(text, model_config.vocab_size) for text in args.prompt_ids]
  elif tokenizer is None:
    raise ValueError(f"{missing}; or give token ids with --prompt-ids, e.g. --prompt-ids 1,2,3")
  else:
    prompts = [tokenizer.encode(t) for t in texts]
    if any(not p for p in prompts):
      raise ValueError("--prompt is empty: give at least one character")
  eos = eos_id(args.checkpoint, tokenizer)
  options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, eos_id=eos)
  check_sampling(model_config.vocab_size, **options)
  if args.speculative:
    from mla_jax.speculative import check_speculative

    try:
      check_speculative(model_config, args.speculative)
    except ValueError as err:
      raise ValueError(f"--speculative {args.speculative}: {err}") from None
  cache_length(max(len(p) for p in prompts), args.max_new_tokens, model_config.max_seq_len)
  if args.cache_dtype is not None:  # checked (e.g. int8 with a baseline) before loading weights
    model_config = dataclasses.replace(model_config, cache_dtype=args.cache_dtype)
  run = load_run(args.checkpoint)
  print(f"loaded step {run.step} of {args.checkpoint}", file=sys.stderr)
  model = Transformer(dataclasses.replace(run.config.model, cache_dtype=model_config.cache_dtype))
  pad_id = run.tokenizer.PAD if run.tokenizer is not None else (0 if eos is None else eos)
  if texts is not None and len(prompts) == 1 and not args.speculative:
    _stream_one(model, run.params, run.tokenizer, texts[0], prompts[0], options, args.seed)
  else:
    _generate_batch(model, run.params, run.tokenizer, prompts, options, args.seed, pad_id,
                    show_ids=texts is None, speculative=args.speculative)
  return 0


def parse_prompt_ids(text: str, vocab_size: int) -> list[int]:
  """One --prompt-ids value, '1,2,3' -> [1, 2, 3]. Raises ValueError (one line) for anything but
  comma-separated integers, or an id outside the model's vocabulary [0, vocab_size)."""
  try:
    ids = [int(part) for part in text.split(",")]
  except ValueError:
    raise ValueError(f"--prompt-ids {text!r} is invalid: expected comma-separated token ids, "
                     "e.g. 1,2,3 (repeat --prompt-ids for a batch)") from None
  outside = [i for i in ids if not 0 <= i < vocab_size]
  if outside:
    raise ValueError(f"--prompt-ids {text!r}: id {outside[0]} is outside the model's vocabulary "
                     f"(ids 0 to {vocab_size - 1})")
  return ids


def _read_prompt_file(name: str) -> list[str]:
  """One prompt per line; blank lines are skipped and reported (they hold no prompt). Raises
  ValueError for a directory, a missing file, or bytes that are not UTF-8 (naming the offset)."""
  path = Path(name)
  if path.is_dir():
    raise ValueError(f"--prompt-file {name!r} is a directory; expected a text file with one "
                     "prompt per line")
  if not path.is_file():
    raise ValueError(f"--prompt-file {name!r} does not exist")
  data = path.read_bytes()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as err:
    line = data.count(b"\n", 0, err.start) + 1
    raise ValueError(f"--prompt-file {name!r} is not UTF-8 text: byte offset {err.start:,} "
                     f"(line {line}) is 0x{data[err.start]:02x} ({err.reason}); save the file as "
                     "UTF-8") from None
  lines = text.splitlines()
  blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
  texts = [line for line in lines if line.strip()]
  if not texts:
    raise ValueError(f"--prompt-file {name!r} holds no non-empty line")
  if blank:
    print(f"--prompt-file {name}: skipped {len(blank)} blank line(s) (line "
          f"{', '.join(map(str, blank))}); generating {len(texts)} prompt(s)", file=sys.stderr)
  return texts


def _rate_line(compile_s: float, prompt_tokens: int, new_tokens: int, seconds: float) -> str:
  """The timing line both generate modes print: compilation apart, then prefill + decode."""
  return (f"compile: {compile_s:.2f} s (not counted below); generation: {prompt_tokens} prompt "
          f"tokens + {new_tokens} new tokens in {seconds:.3f} s = "
          f"{new_tokens / max(seconds, 1e-9):,.1f} new tokens/s")


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
  print(_rate_line(compiled - start, len(prompt), len(new), done - compiled), file=sys.stderr)
  print(f"of which prefill: {len(prompt)} tokens in {first_at - compiled:.4f} s; decode: "
        f"{decoded} tokens in {done - first_at:.3f} s = "
        f"{decoded / max(done - first_at, 1e-9):,.1f} tokens/s", file=sys.stderr)


def _generate_batch(model, params, tokenizer, prompts: list[list[int]], options: dict,
                    seed: int, pad_id: int, show_ids: bool = False, speculative: int = 0) -> None:
  """One compiled loop for the whole batch; prints each row when all are done: its text, or with
  show_ids its ids as 'ids: PROMPT + NEW' (comma-separated) and then its text when the model has
  a tokenizer. Compilation (tracing, lowering, XLA) is timed from JAX's own compile events and
  reported apart. With speculative=K the MTP module drafts K tokens per verify step, and a line
  gives the share of drafts kept per position."""
  import time

  from mla_jax.compile_clock import compile_seconds
  from mla_jax.sampling import generate

  start, compile_s = time.perf_counter(), compile_seconds()
  out, lengths, *stats = generate(model, params, prompts, seed=seed, pad_id=pad_id,
                                  return_lengths=True, speculative=speculative,
                                  return_stats=bool(speculative), **options)
  elapsed = time.perf_counter() - start
  compile_s = compile_seconds() - compile_s
  for prompt, row, length in zip(prompts, out, lengths):
    if show_ids:
      new = row[len(prompt):length].tolist()
      print(f"ids: {','.join(map(str, prompt))} + {','.join(map(str, new))}")
    if tokenizer is not None:
      print(tokenizer.decode(row[:length]))
    print("---")
  prompt_tokens = sum(len(p) for p in prompts)
  new = int(lengths.sum()) - prompt_tokens
  print(_rate_line(compile_s, prompt_tokens, new, elapsed - compile_s)
        + f"; {len(prompts)} prompts ({prompt_tokens} tokens)", file=sys.stderr)
  if stats:
    (stats,) = stats
    kept = ", ".join(f"{rate:.1%}" for rate in stats.acceptance)
    print(f"speculative: {speculative} drafts per verify step; kept per draft position: {kept}; "
          f"{stats.tokens_per_round:.2f} tokens per verify step ({stats.rounds} steps)",
          file=sys.stderr)


def checkpoint_dtype(directory: str | Path) -> tuple[str, str]:
  """(dtype, why) for `convert --dtype auto`: the checkpoint's own dtype from config.json
  (`torch_dtype`, or `dtype` in newer transformers), bfloat16 kept as bfloat16; float32 for
  anything else, which float32 represents exactly."""
  config_file = Path(directory).expanduser() / "config.json"
  if config_file.is_file():
    from mla_jax.hf.safetensors import read_json  # names the file when it is not JSON

    hf = read_json(config_file)
    if not isinstance(hf, dict):
      raise ValueError(f"{config_file} must hold a JSON object (the model's config), got "
                       f"{type(hf).__name__}; download it again")
    declared = hf.get("torch_dtype") or hf.get("dtype")
    if declared == "bfloat16":
      return "bfloat16", "the checkpoint's torch_dtype"
    if declared:
      return "float32", f"the checkpoint's torch_dtype is {declared}"
  return "float32", "config.json names no torch_dtype"


def _convert(args: argparse.Namespace) -> int:
  from mla_jax.hf.load import convert_hf

  source = Path(args.from_hf).expanduser()
  if not source.exists():
    raise ValueError(f"--from-hf {args.from_hf!r} does not exist; give the local directory of a "
                     "Hugging Face DeepseekV2/V3 model (config.json and *.safetensors)")
  if source.is_file():
    raise ValueError(f"--from-hf {args.from_hf!r} is a file; expected the model's directory "
                     "(config.json and *.safetensors)")
  dtype, why = args.dtype, "--dtype"
  if dtype == "auto":
    dtype, why = checkpoint_dtype(source)
  out = convert_hf(args.from_hf, args.out, dtype=dtype)
  print(f"dtype: {dtype} ({why})", file=sys.stderr)  # said once the conversion succeeded
  if (Path(out) / "tokenizer.json").is_file():
    print(f"wrote {out}: run `mla-jax generate --checkpoint {out} --prompt ...`")
  else:  # text prompts are refused until the model's tokenizer is there
    print(f"wrote {out}: copy the model's tokenizer.json into it, then run `mla-jax generate "
          f"--checkpoint {out} --prompt ...` (or prompt with token ids: --prompt-ids 1,2,3)")
  return 0


def _export(args: argparse.Namespace) -> int:
  from mla_jax.hf.export import export_run

  out = export_run(args.checkpoint, args.out, args.dtype, args.max_shard_size,
                   log=lambda line: print(line, file=sys.stderr))
  print(f"wrote {out}: transformers' AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it")
  return 0


def _convert_to_mla(args: argparse.Namespace) -> int:
  from mla_jax.conversion.convert import convert_to_mla, report_lines

  report = convert_to_mla(args.source, args.out, args.kv_lora_rank, args.rope_dim, args.method,
                          args.calibration, args.calibration_samples,
                          log=lambda line: print(line, file=sys.stderr))
  for line in report_lines(report):
    print(line)
  print(f"wrote {args.out}: fine-tune it with `mla-jax train --init-from {args.out}`, run it with "
        f"`mla-jax generate --checkpoint {args.out}`")
  return 0


def _serve(args: argparse.Namespace) -> int:
  try:
    from mla_jax.serving import server
  except ModuleNotFoundError as err:
    if (err.name or "").split(".")[0] not in ("fastapi", "uvicorn", "starlette"):
      raise
    raise ValueError(f"mla-jax serve needs FastAPI and uvicorn ({err.name} is not installed): "
                     'pip install -e ".[serve]"') from None
  return server.serve(args)


def _bench(args: argparse.Namespace) -> int:
  from mla_jax import bench

  return bench.run(args)


TRAIN_EPILOG = """\
workdir: where the run lives: config.yaml, checkpoints/, metrics.jsonl, tensorboard/, loss.png.
  Unset (workdir: null), it is runs/<config name>-<run id>, the id a hash of the fields that
  define the checkpoints (model, data, seed, optimisation), so a different run gets a different
  directory and the same command resumes its own. A workdir holding another run is refused with
  the differing fields named; a run that reached train.steps says "already complete at step N".
Config: a YAML path or a preset name (%(presets)s).
Exit status: 0 done (or already complete), 1 training failed, 2 bad input, 130 stopped by
  Ctrl-C, 143 by SIGTERM (the training loop saves a checkpoint first; run the same command to
  resume)."""


SERVE_EPILOG = """\
Routes: POST /v1/completions (OpenAI's; "stream": true for server-sent events), GET /v1/models,
  GET /health. docs/serving.md has the request fields, errors and curl examples.
Stopping: SIGTERM or Ctrl-C stops admitting (503), lets running requests finish for up to
  --drain-timeout seconds, cancels the rest and exits 0; a second signal exits at once.
Exit status: 0 stopped after draining, 1 the engine failed while serving, 2 bad input or the
  serve extra missing, 130 / 143 stopped by Ctrl-C / SIGTERM while loading or by a second
  signal."""


def _command(commands, name: str, run, **kwargs) -> argparse.ArgumentParser:
  """A subcommand whose --help shows every default."""
  parser = commands.add_parser(name, formatter_class=HelpFormatter, **kwargs)
  parser.set_defaults(run=run)
  return parser


def _config_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("config", nargs="?", metavar="CONFIG",
                      help="YAML config path or preset name, e.g. configs/tiny.yaml or "
                      "deepseek_v2 (default: the built-in tiny model)")
  parser.add_argument("overrides", nargs="*", metavar="key=value",
                      help="dotted overrides, e.g. model.kv_lora_rank=64 train.steps=200 "
                      "workdir=runs/mine (default: none)")


def build_parser() -> argparse.ArgumentParser:
  parser = ArgumentParser(
      prog="mla-jax", description="Multi-head Latent Attention for JAX: inspect, train, decode.")
  parser.add_argument("--version", action="version", version=f"mla-jax {mla_jax.__version__}")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND")
  info = _command(commands, "info", _info, help="parameter count and KV-cache bytes per token")
  _config_arguments(info)

  train = _command(
      commands, "train", _train, help="train (or resume) a model; with no arguments, the tiny "
      "model on the Python standard library's sources",
      epilog=TRAIN_EPILOG % {"presets": ", ".join(presets())})
  _config_arguments(train)
  train.add_argument("--init-from", metavar="WORKDIR",
                     help="start from the latest parameters of this workdir (e.g. from `mla-jax "
                          "convert-to-mla`) with a fresh optimizer: fine-tuning; without CONFIG "
                          "its own config.yaml is the config (default: a random init)")
  train.add_argument("--print-config", action="store_true",
                     help="print the resolved config (CONFIG with the overrides applied, workdir "
                     "resolved) as YAML and exit, without training or creating the workdir")
  multi = train.add_argument_group("multi-process (one command per process or host)")
  multi.add_argument("--distributed", action="store_true",
                     help="call jax.distributed.initialize() and let JAX find the coordinator")
  multi.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
  multi.add_argument("--num-processes", type=int, help="with --coordinator: how many processes")
  multi.add_argument("--process-id", type=int, help="with --coordinator: this process's rank")

  gen = _command(commands, "generate", _generate,
                 help="continue prompts with a model from `mla-jax train` or `mla-jax convert`")
  gen.add_argument("--checkpoint", required=True, metavar="WORKDIR",
                   help="a workdir from `mla-jax train` or `mla-jax convert` (its latest "
                        "checkpoint is used)")
  gen.add_argument("--prompt", help="prompt text (streamed continuation)")
  gen.add_argument("--prompt-file", metavar="FILE",
                   help="one prompt per line, generated as one batch (blank lines skipped)")
  gen.add_argument("--prompt-ids", action="append", metavar="IDS",
                   help="a prompt as comma-separated token ids, e.g. 1,2,3, for a model without "
                        "a tokenizer; repeat it for a batch. Prints each row's ids as 'ids: "
                        "PROMPT + NEW', then its text when the workdir has a tokenizer "
                        "(default: none)")
  gen.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add per prompt")
  gen.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
  gen.add_argument("--top-k", type=int, default=None, help="sample among the k most likely")
  gen.add_argument("--top-p", type=float, default=None,
                   help="sample among the most likely tokens holding this probability mass")
  gen.add_argument("--seed", type=int, default=0, help="sampling seed")
  gen.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="self-speculative decoding: the model's MTP module drafts K tokens, the "
                        "model verifies them in one step (needs model.num_mtp_layers >= 1; the "
                        "output is printed when done, not streamed; default: 0, off)")
  gen.add_argument("--cache-dtype", choices=CACHE_DTYPES, default=None,
                   help="decode cache storage (default: model.cache_dtype, else model.dtype); "
                        "int8/int4 quantize MLA's latent")

  convert = _command(commands, "convert", _convert,
                     help="a Hugging Face DeepseekV2/V3 (or Llama, Qwen2, Mistral) directory -> "
                          "workdir")
  convert.add_argument("--from-hf", required=True, metavar="DIR",
                       help="local directory with config.json and *.safetensors")
  convert.add_argument("--out", required=True, metavar="WORKDIR", help="new workdir to write")
  convert.add_argument("--dtype", default="auto",
                       help="parameter and activation dtype: auto keeps the checkpoint's own "
                       "torch_dtype (bfloat16 stays bfloat16, float32 otherwise); or float32, "
                       "bfloat16, float16 (bf16, fp32, fp16 also work)")

  to_mla = _command(commands, "convert-to-mla", _convert_to_mla,
                    help="an MHA/GQA/MQA model (workdir, or Llama / Mistral directory) -> an "
                         "MLA workdir (MHA2MLA / TransMLA)")
  to_mla.add_argument("source", metavar="SRC", help="an mla-jax MHA/GQA/MQA workdir, or a Hugging "
                      "Face Llama or Mistral directory")
  to_mla.add_argument("out", metavar="OUT", help="new workdir to write")
  to_mla.add_argument("--kv-lora-rank", type=int, required=True, metavar="C",
                      help="latent width cached per token (at most model.hidden_size)")
  to_mla.add_argument("--rope-dim", type=int, required=True, metavar="R",
                      help="shared RoPE key width cached per token (even; at most one kv head's "
                           "RoPE width for a DeepSeek-compatible model, or whole heads' widths)")
  to_mla.add_argument("--method", choices=("mha2mla", "transmla"), default="mha2mla",
                      help="which RoPE features keep their rotation: MHA2MLA's largest "
                           "contributions, or TransMLA's RoRoPE principal directions")
  to_mla.add_argument("--calibration", metavar="DATA",
                      help="text for the activation-aware conversion: a file, directory or glob, "
                           "or 'stdlib' (the corpus `mla-jax train` uses by default); its "
                           "training split is read (default: weight-only)")
  to_mla.add_argument("--calibration-samples", type=int, default=64, metavar="N",
                      help="calibration windows of up to 256 tokens")

  export = _command(commands, "export", _export,
                    help="a workdir's MLA model -> a Hugging Face DeepseekV2/V3 directory")
  export.add_argument("checkpoint", metavar="CHECKPOINT_DIR",
                      help="a workdir from `mla-jax train`, `convert` or `convert-to-mla` (its "
                           "latest checkpoint is exported)")
  export.add_argument("out", metavar="OUT_DIR", help="new directory to write")
  export.add_argument("--dtype", default="auto",
                      help="weight dtype: auto keeps the parameters' own; or float32, bfloat16, "
                           "float16 (the router stays float32)")
  export.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                      help="largest safetensors file, e.g. 5GB or 500MiB; more files get an index")

  serve = _command(commands, "serve", _serve, epilog=SERVE_EPILOG,
                   help="an OpenAI-compatible HTTP server (POST /v1/completions) over the "
                        "serving engine; needs the serve extra")
  serve.add_argument("--checkpoint", required=True, metavar="WORKDIR",
                     help="a workdir from `mla-jax train` or `mla-jax convert` (its latest "
                          "checkpoint is served)")
  serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
  serve.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one")
  serve.add_argument("--served-model-name", metavar="NAME",
                     help="the model's name in /v1/models and requests (default: --checkpoint "
                          "as given)")
  serve.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="on SIGTERM / Ctrl-C, how long running requests may take to finish "
                          "before they are cancelled")
  engine = serve.add_argument_group("engine (default: the engine's own)")
  engine.add_argument("--max-seqs", type=int, help="sequences decoded at once (default: the "
                      "engine's)")
  engine.add_argument("--page-size", type=int, help="token slots per cache page (default: the "
                      "engine's)")
  pool = engine.add_mutually_exclusive_group()
  pool.add_argument("--num-pages", type=int, help="cache pages in the pool (default: room for "
                    "--max-seqs sequences of model.max_seq_len)")
  pool.add_argument("--cache-budget", metavar="SIZE", help="cache bytes, e.g. 64MiB or 2GiB, "
                    "as pages (default: see --num-pages)")
  engine.add_argument("--prefill-chunk", type=int, help="prompt tokens per prefill chunk "
                      "(default: the engine's)")
  engine.add_argument("--cache-dtype", choices=CACHE_DTYPES, default=None,
                      help="cache storage (default: model.cache_dtype, else model.dtype); "
                           "int8/int4 quantize MLA's latent")
  engine.add_argument("--no-prefix-sharing", action="store_true",
                      help="do not reuse the cached pages of a prompt prefix seen before")

  from mla_jax.bench import add_bench_parser  # light: suites are imported when one runs

  add_bench_parser(commands, HelpFormatter).set_defaults(run=_bench)
  return parser


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
  """argparse, plus: key=value overrides may also follow options (`train CONFIG --distributed
  train.steps=2`), which argparse alone rejects once the positionals are consumed."""
  args, extra = parser.parse_known_args(argv)
  if extra:
    if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
      parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = list(args.overrides) + extra
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = build_parser()
  args = parse_args(parser, argv)
  if args.command is None:
    parser.print_help()
    return 2
  with INTERRUPTS.install():  # before JAX is imported: Ctrl-C at any moment exits cleanly
    try:
      return args.run(args)
    except ValueError as err:  # bad config or input: one clear line, no traceback
      print(f"mla-jax: error: {err}", file=sys.stderr)
      return 2
    except BrokenPipeError:  # `mla-jax info | head`: the reader left; say nothing more
      import os

      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
      return 141  # 128 + SIGPIPE, as a shell reports it
    except OSError as err:  # the file system said no (permissions, a full disk, ...): one line
      print(f"mla-jax: error: {err}", file=sys.stderr)
      return 2


if __name__ == "__main__":
  sys.exit(main())
