"""`mla-jax bench memory`: KV-cache elements and bytes per token, from the real cache structures.

Every number comes from `jax.eval_shape(init_cache)` of a model config: nothing is allocated, and
what is counted is exactly what decoding would allocate. Rows: each DeepSeek preset (V2, V2-Lite,
V3) with its MLA and with its attention replaced by MHA, GQA (8 KV heads) and MQA, plus a
DeepSeek-67B-shaped GQA baseline. The DeepSeek-V2 paper's Table 1 (arXiv:2405.04434) counts
elements per token as MHA 2 n_h d_h l, GQA 2 n_g d_h l, MQA 2 d_h l, MLA (d_c + d_h^R) l with
d_h = 128 for keys and values alike; the baselines here are built with exactly that head width
(keys of qk_nope_head_dim + qk_rope_head_dim = d_h, values of v_head_dim = d_h), so each row can
be checked against its formula. The paper's 93.3% is DeepSeek-V2 against DeepSeek 67B with the
cache stored at about 6 bits per element: shown as its own (computed) row. Beside it, each preset's
MLA cache as this library stores it quantized (`model.cache_dtype` int8 / int4: the latent c_kv
quantized with one float32 scale per token, k_rope kept in bfloat16; mla_jax/cache.py), with its
exact bytes from the same init_cache structure, scales included.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax.bench.common import Report, Table, display_path, header_lines, progress
from mla_jax.cache import LatentCache
from mla_jax.config.loader import load_config
from mla_jax.config.model import ModelConfig
from mla_jax.kinds import init_cache, init_layer_cache

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = (("DeepSeek-V2", "deepseek_v2.yaml"), ("DeepSeek-V2-Lite", "deepseek_v2_lite.yaml"),
           ("DeepSeek-V3", "deepseek_v3.yaml"))
GQA_KV_HEADS = 8
PAPER_BITS = 6  # DeepSeek-V2 stores its KV cache at ~6 bits per element on average (Sec. 3.2.3)
PAPER_REDUCTION = 0.933
QUANTIZED = ("int8", "int4")  # model.cache_dtype values that quantize MLA's latent

# DeepSeek LLM 67B (arXiv:2401.02954, Table 2): 95 layers, hidden 8192, 64 query heads, GQA with
# 8 key/value heads of 128, bfloat16. RoPE covers all 128 key features there; this code's
# baselines rotate the last qk_rope_head_dim of them, which changes no cached size.
DEEPSEEK_67B = ModelConfig(
    vocab_size=102400, hidden_size=8192, num_layers=95, num_heads=64, q_lora_rank=None,
    kv_lora_rank=512, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128,
    intermediate_size=22016, max_seq_len=4096, dtype="bfloat16", param_dtype="bfloat16",
    attention="gqa", num_kv_heads=8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--configs", default=display_path(CONFIGS), metavar="DIR",
                      help="directory holding deepseek_v2.yaml, deepseek_v2_lite.yaml and "
                           "deepseek_v3.yaml (default: the repository's configs/)")


def cached_values(layer) -> int:
  """Cached values in one layer's cache (shapes only): the paper's 'elements'. A quantized
  latent counts its values (int4: two per stored byte), not its per-token scales, which are
  bytes of metadata (counted in bytes, not in elements)."""
  if isinstance(layer, LatentCache):
    latent = int(np.prod(layer.c_kv.shape)) * (2 if layer.dtype == jnp.int4 else 1)
    return latent + int(np.prod(layer.k_rope.shape))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(layer))


def cache_per_token(config: ModelConfig) -> tuple[int, int, int, int]:
  """(elements per token per layer, bytes per token per layer, elements per token, bytes per
  token) of init_cache(config) in its kv_cache_dtype, from shapes alone. Bytes are every stored
  array (latent, scales, RoPE key; or K and V). The [B] length vector is per sequence, not per
  token, and not counted."""
  batch, slots = 1, 1
  cache = jax.eval_shape(lambda: init_cache(config, batch, slots))
  elements = [cached_values(layer) // (batch * slots) for layer in cache.layers]
  nbytes = [sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(layer))
            // (batch * slots) for layer in cache.layers]
  return elements[0], nbytes[0], sum(elements), sum(nbytes)


def baseline(config: ModelConfig, attention: str, head_dim: int) -> ModelConfig:
  """`config` with MHA/GQA/MQA attention whose keys and values are both head_dim wide, as in the
  paper's Table 1 (RoPE keeps its width inside the key)."""
  rope = config.qk_rope_head_dim
  if head_dim <= rope:
    raise ValueError(f"head_dim={head_dim} must exceed qk_rope_head_dim={rope}")
  return dataclasses.replace(config, attention=attention,
                             num_kv_heads=GQA_KV_HEADS if attention == "gqa" else None,
                             qk_nope_head_dim=head_dim - rope, qk_rope_head_dim=rope,
                             v_head_dim=head_dim)


# The paper's Table 1 (elements per token, all layers), by the attention kind it names:
# kind -> config -> (formula, elements).
TABLE1 = {
    "mla": lambda c: (f"(d_c + d_h^R) l = ({c.kv_lora_rank} + {c.qk_rope_head_dim}) x "
                      f"{c.num_layers}", (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_layers),
    "mha": lambda c: (f"2 n_h d_h l = 2 x {c.num_heads} x {c.v_head_dim} x {c.num_layers}",
                      2 * c.num_heads * c.v_head_dim * c.num_layers),
    "mqa": lambda c: (f"2 d_h l = 2 x {c.v_head_dim} x {c.num_layers}",
                      2 * c.v_head_dim * c.num_layers),
    "gqa": lambda c: (f"2 n_g d_h l = 2 x {c.kv_heads} x {c.v_head_dim} x {c.num_layers}",
                      2 * c.kv_heads * c.v_head_dim * c.num_layers),
}


def table1_formula(config: ModelConfig) -> tuple[str, int]:
  """The paper's Table 1 elements per token (all layers) for this config, and its formula."""
  return TABLE1[config.attention](config)


def _row(model: str, label: str, config: ModelConfig, reference_bytes: Optional[int],
         bits: Optional[int] = None) -> dict:
  elements_layer, bytes_layer, elements, nbytes = cache_per_token(config)
  if bits is not None:  # the same elements stored at `bits` per element
    bytes_layer, nbytes = elements_layer * bits / 8, elements * bits / 8
  formula, expected = table1_formula(config)
  kind = config.kv_cache_dtype
  layer = jax.eval_shape(lambda: init_layer_cache(config, 1, 1))  # what the kind caches
  if isinstance(layer, LatentCache) and layer.quantized:
    shape = (f"c_kv {config.kv_lora_rank} + scale 1 + k_rope {config.qk_rope_head_dim}")
    precision = f"{kind} c_kv, float32 scale, bfloat16 k_rope"
  elif isinstance(layer, LatentCache):
    shape = f"c_kv {config.kv_lora_rank} + k_rope {config.qk_rope_head_dim}"
    precision = kind
  else:
    shape = f"{config.kv_heads} x (k {config.qk_head_dim} + v {config.v_head_dim})"
    precision = kind
  if bits is not None:
    precision = f"{bits} bits"
  row = {"model": model, "attention": label, "cached": shape, "precision": precision,
         "layers": config.num_layers, "elements_per_token_per_layer": elements_layer,
         "bytes_per_token_per_layer": bytes_layer, "elements_per_token": elements,
         "bytes_per_token": nbytes, "table1_formula": formula, "table1_elements": expected}
  if reference_bytes is not None:
    row["reduction_vs_67b"] = 1 - nbytes / reference_bytes
    row["reduction"] = (f"{row['reduction_vs_67b']:.1%}" if nbytes <= reference_bytes
                        else f"none: {nbytes / reference_bytes:,.1f}x larger")
  else:
    row["reduction"] = "(baseline)"
  return row


def rows(configs_dir: Path) -> list[dict]:
  """All memory rows; the first is the 67B baseline every reduction is measured against."""
  base = _row("DeepSeek 67B", "GQA-8", DEEPSEEK_67B, None)
  out = [base]
  for name, filename in PRESETS:
    path = Path(configs_dir) / filename
    if not path.is_file():
      raise ValueError(f"--configs {str(configs_dir)!r} has no {filename}: point it at the "
                       "repository's configs/ directory")
    progress(f"{name}: MLA and its baselines, from {filename}")
    mla = load_config(path).model
    head_dim = mla.v_head_dim
    for attention, label in (("mha", "MHA"), ("gqa", f"GQA-{GQA_KV_HEADS}"), ("mqa", "MQA")):
      out.append(_row(name, label, baseline(mla, attention, head_dim), base["bytes_per_token"]))
    out.append(_row(name, "MLA", mla, base["bytes_per_token"]))
    for kind in QUANTIZED:  # the caches this library stores quantized
      out.append(_row(name, "MLA", dataclasses.replace(mla, cache_dtype=kind),
                      base["bytes_per_token"]))
    out.append(_row(name, "MLA", mla, base["bytes_per_token"], bits=PAPER_BITS))
  return out


COLUMNS = (("model", "model"), ("attention", "attention"), ("cached", "cached per layer"),
           ("precision", "stored as"), ("elements_per_token_per_layer", "elements/token/layer"),
           ("bytes_per_token_per_layer", "bytes/token/layer"),
           ("elements_per_token", "elements/token (all layers)"),
           ("bytes_per_token", "bytes/token (all layers)"),
           ("table1_formula", "paper Table 1 (elements/token)"),
           ("reduction", "smaller than 67B (bytes)"))


def run(args: argparse.Namespace) -> Report:
  table_rows = rows(Path(args.configs))
  v2 = {r["precision"].split()[0]: r for r in table_rows
        if r["model"] == "DeepSeek-V2" and r["attention"] == "MLA"}
  notes = [
      "Counted from `jax.eval_shape(init_cache(config, 1, 1))`: exactly what decoding allocates. "
      "Baselines (MHA, GQA with 8 KV heads, MQA and DeepSeek 67B) use keys and values of "
      "d_h = 128, as in the paper's Table 1; every row's elements equal its Table 1 formula.",
      f"DeepSeek-V2 MLA stored at ~{PAPER_BITS} bits per element: {v2[str(PAPER_BITS)]['reduction']}"
      f" smaller than DeepSeek 67B's bf16 GQA cache (paper: {PAPER_REDUCTION:.1%}). The "
      f"{PAPER_BITS}-bit rows are the paper's average precision applied to the same elements, not "
      "a cache this code stores.",
      "The int8 and int4 rows are caches this code stores (`model.cache_dtype`, `mla-jax generate "
      "--cache-dtype`): per layer and token the latent's C values at 1 byte (int8) or 1/2 byte "
      "(int4, two per byte), one float32 scale (4 bytes) and the R RoPE-key values in bfloat16 "
      "(2 bytes): L (C + 4 + 2R) and L (C/2 + 4 + 2R) bytes. DeepSeek-V2: "
      f"int8 {v2['int8']['bytes_per_token']:,} bytes ({v2['int8']['reduction']} smaller), "
      f"int4 {v2['int4']['bytes_per_token']:,} bytes ({v2['int4']['reduction']} smaller than "
      "DeepSeek 67B).",
  ]
  table = Table("KV cache per token", COLUMNS, table_rows, notes)
  return Report("memory", header_lines("bfloat16 (as each preset), int8/int4 rows as stored by "
                                       "model.cache_dtype, 6-bit rows computed",
                                       args.command), [table],
                plot=lambda path: plot(table_rows, path))


def plot(table_rows: list[dict], path: Path) -> None:
  import matplotlib.pyplot as plt

  def label(row: dict) -> str:  # a preset's own dtype unsaid; int8 / int4 / 6 bits named
    stored = row["precision"].split(",")[0].replace(" c_kv", "")
    return f"{row['model']} {row['attention']}" + (f" ({stored})" if stored in QUANTIZED or
                                                   "bits" in stored else "")

  labels = [label(r) for r in table_rows]
  values = [r["bytes_per_token"] for r in table_rows]
  colors = ["tab:red" if r["attention"] == "MLA" else "tab:gray" for r in table_rows]
  fig, ax = plt.subplots(figsize=(8, 0.32 * len(labels) + 1.2))
  ax.barh(range(len(labels)), values, color=colors)
  ax.set_yticks(range(len(labels)), labels, fontsize=8)
  ax.invert_yaxis()
  ax.set_xscale("log")
  ax.set_xlabel("KV-cache bytes per token, all layers (log scale)")
  for i, value in enumerate(values):
    ax.text(value, i, f" {value:,.0f}", va="center", fontsize=7)
  ax.grid(axis="x", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
