"""`mla-jax bench train`: training step time and tokens/s, MLA against MHA, GQA and MQA; and the
training step with the naive path against flash attention as T grows (bench/train_attention.py).

Each model is the library's Transformer trained by the library's own `Trainer` (AdamW step,
state donated), at the same parameter count as the MLA model (the baselines' MLP width is
adjusted, `common.match_parameters`). Batches are random token ids: speed does not depend on
the text. Variants are rows (name, model-config overrides).

The paper's 42.5% lower training cost compares DeepSeek-V2 (MoE, 21B of 236B parameters active
per token) with dense DeepSeek 67B in GPU hours per trillion tokens: the saving comes from the
sparse MoE, not from attention, so attention alone is not expected to reproduce it. The second
table is the mechanism at small scale: an MLA + DeepSeekMoE model (V2's recipe) against a dense
MHA model of the same total parameters and one of the same active parameters, trained by the
same Trainer, with FLOPs per token from XLA's cost analysis of each compiled train step.

A third table (--mtp on) is the cost of DeepSeek-V3's multi-token prediction: the MLA model with 0,
1 and 2 MTP modules (model.num_mtp_layers), the step time and the FLOPs per token (loss
gradient) of each, relative to the model without.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax.bench import add_quick_option, train_attention
from mla_jax.bench.common import (Report, Table, cost, count_params, display_path, header_lines,
                                  match_parameters, select_variants, time_calls)
from mla_jax.bench.common import progress
from mla_jax.bench.memory import cache_per_token
from mla_jax.config.loader import load_config
from mla_jax.config.model import ModelConfig
from mla_jax.config.run import Config, TrainConfig
from mla_jax.model import Transformer
from mla_jax.train.step import Trainer, compute_grads

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
  add_quick_option(parser, "--batch", full=16, quick=8, type=int, help="sequences per step")
  add_quick_option(parser, "--seq-len", full=128, quick=16, type=int,
                   help="tokens per sequence")
  add_quick_option(parser, "--repeats", full=20, quick=2, type=int, help="timed steps")
  add_variants_argument(parser)
  parser.add_argument("--moe", default="on", choices=["on", "off"],
                      help="also train a small MLA + DeepSeekMoE model against dense MHA models "
                           "of its total and of its active parameters (default: %(default)s)")
  train_attention.add_arguments(parser)
  parser.add_argument("--mtp", default="off", choices=["on", "off"],
                      help="also train the MLA model with 1 and 2 multi-token-prediction "
                           "modules: their cost in step time and FLOPs (default: %(default)s)")


def model_config(args: argparse.Namespace) -> ModelConfig:
  model = load_config(args.config).model
  if args.quick:
    model = dataclasses.replace(model, num_layers=1)
  if args.seq_len > model.max_seq_len:
    raise ValueError(f"--seq-len {args.seq_len} is invalid: the model's max_seq_len is "
                     f"{model.max_seq_len}")
  return model


def measure(name: str, model: ModelConfig, batch: int, seq_len: int, repeats: int) -> dict:
  progress(f"{name}, training step of {batch} x {seq_len} tokens ({repeats} timed)")
  config = Config(model=model, train=TrainConfig(batch_size=batch, seq_len=seq_len, steps=10**6,
                                                warmup_steps=10))
  trainer = Trainer.build(config)
  start = time.perf_counter()
  trainer.compile_train_step()  # the program train_step then runs
  compile_s = time.perf_counter() - start
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
          "tokens_per_s": batch * seq_len / timing.median_s, "compile_s": compile_s,
          "devices": jax.device_count()}


MTP_DEPTHS = (0, 1, 2)


def mtp_rows(model: ModelConfig, batch: int, seq_len: int, repeats: int) -> list[dict]:
  """The MLA model with 0, 1 and 2 MTP modules: `measure` and FLOPs per token each, and both
  relative to the model without (train.mtp_loss_weight at its default)."""
  rows = []
  for depths in MTP_DEPTHS:
    config = dataclasses.replace(model, num_mtp_layers=depths)
    row = measure(f"{depths} MTP module{'s' * (depths != 1)}", config, batch, seq_len, repeats)
    row["mtp_layers"] = depths
    row["flops_per_token"] = training_flops_per_token(config, batch, seq_len)
    rows.append(row)
  for row in rows:
    row["time_vs_plain"] = row["step_ms"] / rows[0]["step_ms"]
    row["flops_vs_plain"] = row["flops_per_token"] / rows[0]["flops_per_token"]
  return rows


def mtp_table(rows: list[dict], num_layers: int) -> Table:
  one = next(r for r in rows if r["mtp_layers"] == 1)
  columns = (("variant", "model"), ("params", "parameters"),
             ("flops_per_token", "fwd + bwd FLOPs/token (XLA)"), ("flops_vs_plain", "x FLOPs"),
             ("step_ms", "step ms (median)"), ("min_ms", "min"), ("max_ms", "max"),
             ("tokens_per_s", "tokens/s"), ("time_vs_plain", "x step time"),
             ("compile_s", "compile s"))
  return Table("Multi-token prediction: the cost of the MTP modules in training", columns, rows, [
      f"One MTP module (an eh_proj, one Transformer block and the shared output head over the "
      f"{num_layers}-layer model) costs {one['flops_vs_plain'] - 1:.1%} more FLOPs per token "
      f"and {one['time_vs_plain'] - 1:.1%} more step time here (median steps); DeepSeek-V3 adds "
      "one block to 61, so its share is far smaller there.",
      "FLOPs: XLA's count of the loss gradient compiled for one device (the optimizer update not "
      "counted); loss = next-token CE + train.mtp_loss_weight / D x the D depths' CEs."],
      formats={"flops_vs_plain": "{:.3f}x", "time_vs_plain": "{:.3f}x"})


def training_flops_per_token(model: ModelConfig, batch: int, seq_len: int) -> float:
  """Forward + backward FLOPs per token from XLA's cost analysis of the loss gradient compiled
  for one device (whatever mesh the timed step uses; the optimizer update is not counted)."""
  transformer = Transformer(model)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  params = jax.eval_shape(transformer.init, jax.random.key(0), tokens)["params"]
  grads = jax.jit(lambda p, x, y: compute_grads(transformer, p, x, y))
  return float(cost(grads.lower(params, tokens, tokens).compile()).get("flops", 0.0)) / (
      batch * seq_len)


# DeepSeek-V2's MoE recipe in a small model: first layer dense, then 2 shared + top-6 of 64
# routed experts (about 1/8 of the routed parameters active per token).
MOE_MODEL = ModelConfig(vocab_size=260, hidden_size=128, num_layers=4, num_heads=4,
                        q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                        v_head_dim=32, intermediate_size=512, max_seq_len=256,
                        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
                        moe_intermediate_size=64, first_k_dense_replace=1)
QUICK_MOE_MODEL = dataclasses.replace(MOE_MODEL, num_layers=2, n_routed_experts=8,
                                      num_experts_per_tok=2, n_shared_experts=1)


def moe_rows(moe: ModelConfig, batch: int, seq_len: int, repeats: int) -> list[dict]:
  """The MoE model, a dense MHA model of its total parameters and one of its active parameters
  (MLP width matched, `bench.moe.dense_matching`): the training step of each, as `measure`."""
  from mla_jax.bench.moe import active_param_count, dense_matching

  total, active = count_params(moe), active_param_count(moe)
  models = (("MLA + DeepSeekMoE", moe),
            ("dense MHA, same total parameters", dense_matching(moe, total, attention="mha")),
            ("dense MHA, same active parameters", dense_matching(moe, active, attention="mha")))
  rows = []
  for name, config in models:
    row = measure(name, config, batch, seq_len, repeats)
    row["active_params"] = active_param_count(config)
    row["flops_per_token"] = training_flops_per_token(config, batch, seq_len)
    rows.append(row)
  moe_row = rows[0]
  for row in rows:
    row["flops_vs_moe"] = row["flops_per_token"] / moe_row["flops_per_token"]
    row["time_vs_moe"] = moe_row["tokens_per_s"] / row["tokens_per_s"]
  return rows


def moe_table(rows: list[dict]) -> Table:
  moe, same_total, same_active = rows
  saving_flops = 1 - moe["flops_per_token"] / same_total["flops_per_token"]
  columns = (("variant", "model"), ("params", "parameters"), ("active_params", "active"),
             ("flops_per_token", "fwd + bwd FLOPs/token (XLA)"),
             ("flops_vs_moe", "x MoE FLOPs"), ("step_ms", "step ms (median)"),
             ("min_ms", "min"), ("max_ms", "max"), ("tokens_per_s", "tokens/s"),
             ("time_vs_moe", "x MoE time/token"), ("compile_s", "compile s"))
  return Table("DeepSeekMoE against dense models (the mechanism behind the 42.5%)", columns, rows, [
      f"Against the dense model of the same total parameters, the MoE model needs "
      f"{saving_flops:.1%} fewer training FLOPs per token (XLA's count) and takes "
      f"{moe['step_ms'] / same_total['step_ms']:.2f}x its step time here (median steps). The paper's {PAPER_SAVING:.1%} is DeepSeek-V2 "
      "(236B total, 21B active) against dense DeepSeek 67B on H800s, in GPU hours per trillion "
      "tokens: the same mechanism, a different scale and baseline.",
      "active = parameters a token goes through (all but the unchosen routed experts); the dense "
      "models' MLP width is matched to the MoE model's total or active count."])


def run(args: argparse.Namespace) -> Report:
  for name in ("batch", "seq_len", "repeats"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: must be >= 1")
  train_attention.check_options(args)
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
  notes.append(f"compile s = lowering and compiling the train step, apart from the timed steps; "
               f"{rows[0]['devices']} device(s), data parallel.")
  columns = (("variant", "attention"), ("params", "parameters"), ("mlp_width", "MLP width"),
             ("kv_bytes_per_token", "KV bytes/token"), ("step_ms", "step ms (median)"),
             ("min_ms", "min"), ("max_ms", "max"), ("tokens_per_s", "tokens/s"),
             ("vs_mla", "x MLA tokens/s"), ("compile_s", "compile s"))
  table = Table(f"Training step, batch {args.batch} x {args.seq_len} tokens", columns, rows,
                notes)
  tables = [table]
  if args.moe == "on":
    tables.append(moe_table(moe_rows(QUICK_MOE_MODEL if args.quick else MOE_MODEL, args.batch,
                                     args.seq_len, args.repeats)))
  attention = train_attention.tables(args, model)
  tables += attention
  lengths = next((t.rows for t in attention if t.title.startswith("Training step against T")),
                 [])
  if args.mtp == "on":
    tables.append(mtp_table(mtp_rows(model, args.batch, args.seq_len, args.repeats),
                            model.num_layers))
  dtype = f"{model.dtype} (parameters {model.param_dtype})"
  return Report("train", header_lines(dtype, args.command), tables,
                plot=lambda png: plot(rows, png, lengths))


def plot(rows: list[dict], path: Path, lengths: Sequence[dict] = ()) -> None:
  """Training tokens/s of each attention; with the attention table, step time and peak memory
  of the naive and the flash path against T beside it."""
  import matplotlib.pyplot as plt

  panels = 3 if lengths else 1
  fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4), squeeze=False)
  ax = axes[0][0]
  names = [r["variant"] for r in rows]
  ax.bar(names, [r["tokens_per_s"] for r in rows],
         yerr=[[r["tokens_per_s"] - r["tokens_per_s"] * r["step_ms"] / r["max_ms"] for r in rows],
               [r["tokens_per_s"] * r["step_ms"] / r["min_ms"] - r["tokens_per_s"] for r in rows]],
         color=["tab:red" if n == "MLA" else "tab:gray" for n in names], capsize=4)
  ax.set_ylabel("training tokens/s (median; bars: min..max step)")
  if lengths:
    for impl, label, color in (("naive", "naive", "tab:gray"),
                               ("flash_attention", "flash attention", "tab:red")):
      timed = [r for r in lengths if isinstance(r.get(f"{impl}_ms"), float)]
      axes[0][1].plot([r["seq_len"] for r in timed], [r[f"{impl}_ms"] for r in timed], "o-",
                      label=label, color=color)
      axes[0][2].plot([r["seq_len"] for r in lengths], [r[f"{impl}_mib"] for r in lengths],
                      "o-", label=label, color=color)
    for panel, ylabel in ((axes[0][1], "training step ms (median)"),
                          (axes[0][2], "peak memory MiB (XLA)")):
      panel.set_xscale("log", base=2)
      panel.set_yscale("log")
      panel.set_xlabel("T (tokens per sequence)")
      panel.set_ylabel(ylabel)
      panel.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
