"""`mla-jax bench train`: training step time and tokens/s, MLA against MHA, GQA and MQA.

Each model is the library's Transformer trained by the library's own `Trainer` (AdamW step,
state donated), at the same parameter count as the MLA model (the baselines' MLP width is
adjusted, `common.match_parameters`). Batches are random token ids: speed does not depend on
the text. Variants are rows (name, model-config overrides).

The paper's 42.5% lower training cost compares DeepSeek-V2 (MoE, 21B of 236B parameters active
per token) with dense DeepSeek 67B in GPU hours per trillion tokens: the saving comes from the
sparse MoE, not from attention, so attention alone is not expected to reproduce it.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from mla_jax.bench.common import (Report, Table, count_params, display_path, header_lines,
                                  match_parameters, select_variants, time_calls)
from mla_jax.bench.memory import cache_per_token
from mla_jax.config import Config, ModelConfig, TrainConfig, load_config
from mla_jax.train import Trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PAPER_SAVING = 0.425


ATTENTIONS = ("MLA", "MHA", "GQA", "MQA")


def variants(model: ModelConfig, chosen: Sequence[str] = ATTENTIONS
             ) -> list[tuple[str, ModelConfig]]:
  """MLA and the baselines named in `chosen`, at MLA's parameter count (GQA with half the
  heads as KV heads). Rows are (label, config); add a row to compare another model."""
  kinds = {"MLA": {}, "MHA": dict(attention="mha"),
           "GQA": dict(attention="gqa", num_kv_heads=model.num_heads // 2),
           "MQA": dict(attention="mqa")}
  out = []
  for kind in chosen:
    if kind == "MLA":
      out.append(("MLA", model))
      continue
    config = match_parameters(model, dataclasses.replace(model, **kinds[kind]))
    out.append((f"GQA-{config.kv_heads}" if kind == "GQA" else kind, config))
  return out


def add_variants_argument(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--variants", default=None,
                      help=f"comma-separated subset of: {', '.join(ATTENTIONS)} (default: all)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", default=display_path(CONFIGS / "tiny.yaml"),
                      help="the MLA model (YAML; default: %(default)s, the README's model)")
  parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 16; "
                      "--quick 8)")
  parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default "
                      "128; --quick 16)")
  parser.add_argument("--repeats", type=int, default=None, help="timed steps (default 20; "
                      "--quick 2)")
  add_variants_argument(parser)


def resolve_defaults(args: argparse.Namespace) -> None:
  quick = args.quick
  args.batch = args.batch or (8 if quick else 16)
  args.seq_len = args.seq_len or (16 if quick else 128)
  args.repeats = args.repeats or (2 if quick else 20)


def model_config(args: argparse.Namespace) -> ModelConfig:
  model = load_config(args.config).model
  if args.quick:
    model = dataclasses.replace(model, num_layers=1)
  if args.seq_len > model.max_seq_len:
    raise ValueError(f"--seq-len {args.seq_len} is invalid: the model's max_seq_len is "
                     f"{model.max_seq_len}")
  return model


def measure(name: str, model: ModelConfig, batch: int, seq_len: int, repeats: int) -> dict:
  config = Config(model=model, train=TrainConfig(batch_size=batch, seq_len=seq_len, steps=10**6,
                                                warmup_steps=10))
  trainer = Trainer.build(config)
  state = {"state": trainer.init_state()}
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, model.vocab_size, (batch, seq_len + 1), dtype=np.int32)
  inputs, targets = trainer.put_batch(tokens[:, :-1], tokens[:, 1:])

  def one_step():
    state["state"], metrics = trainer.train_step(state["state"], inputs, targets)
    return metrics["loss"]

  timing = time_calls(one_step, repeats, warmup=2)
  _, _, elements, nbytes = cache_per_token(model)
  return {"variant": name, "params": count_params(model), "mlp_width": model.intermediate_size,
          "kv_bytes_per_token": nbytes, "step_ms": timing.median_s * 1e3,
          "min_ms": timing.min_s * 1e3, "max_ms": timing.max_s * 1e3,
          "tokens_per_s": batch * seq_len / timing.median_s, "compile_s": timing.compile_s,
          "devices": jax.device_count()}


def run(args: argparse.Namespace) -> Report:
  for name in ("batch", "seq_len", "repeats"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: must be >= 1")
  model = model_config(args)
  rows = [measure(name, config, args.batch, args.seq_len, args.repeats)
          for name, config in variants(model, select_variants(ATTENTIONS, args.variants))]
  mla = next((r for r in rows if r["variant"] == "MLA"), None)
  for row in rows:
    row["vs_mla"] = None if mla is None else row["tokens_per_s"] / mla["tokens_per_s"]
  notes = ["Equal parameter count: each baseline's MLP width is set so its total matches MLA's."]
  if mla is not None:
    ratios = ", ".join(f"{1 / r['vs_mla']:,.2f}x {r['variant']}" for r in rows if r is not mla)
    notes.append(f"MLA's training tokens/s here: {ratios or 'no baseline run'}. The paper's "
                 f"{PAPER_SAVING:.1%} lower training cost is DeepSeek-V2 (MoE, 21B active "
                 "parameters) against dense DeepSeek 67B: a saving from sparse experts that "
                 "attention alone is not expected to give.")
  notes.append(f"compile s = first step minus a steady step; {rows[0]['devices']} device(s), "
               "data parallel.")
  columns = (("variant", "attention"), ("params", "parameters"), ("mlp_width", "MLP width"),
             ("kv_bytes_per_token", "KV bytes/token"), ("step_ms", "step ms (median)"),
             ("min_ms", "min"), ("max_ms", "max"), ("tokens_per_s", "tokens/s"),
             ("vs_mla", "x MLA tokens/s"), ("compile_s", "compile s"))
  table = Table(f"Training step, batch {args.batch} x {args.seq_len} tokens", columns, rows,
                notes)
  dtype = f"{model.dtype} (parameters {model.param_dtype})"
  return Report("train", header_lines(dtype, args.command), [table],
                plot=lambda png: plot(rows, png))


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4))
  names = [r["variant"] for r in rows]
  ax.bar(names, [r["tokens_per_s"] for r in rows],
         yerr=[[r["tokens_per_s"] - r["tokens_per_s"] * r["step_ms"] / r["max_ms"] for r in rows],
               [r["tokens_per_s"] * r["step_ms"] / r["min_ms"] - r["tokens_per_s"] for r in rows]],
         color=["tab:red" if n == "MLA" else "tab:gray" for n in names], capsize=4)
  ax.set_ylabel("training tokens/s (median; bars: min..max step)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
