"""`mla-jax convert-to-mla`: an MHA/GQA/MQA model (an mla-jax workdir, or a Llama / Mistral
directory) -> an MLA workdir that `mla-jax generate` runs and `mla-jax train --init-from`
fine-tunes.

Per layer (docs/conversion.md has the math): the RoPE plan (rope_plan.py) decides which query and
key RoPE pairs keep their rotation and in which of k_rope's slots; the rest of each key joins its
no-RoPE part; the no-RoPE keys and the values of all kv heads are factored jointly through the
latent (latent.py); queries keep their weights (permuted into MLA's [no-RoPE | RoPE] layout, and
scaled by the ratio of the two models' softmax scales), o_proj, the norms, the MLP and the
embeddings are copied. Everything is computed in float64 on the host.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from mla_jax.config.model import ModelConfig
from mla_jax.conversion.calibration import (LayerStats, calibrate, calibration_tokens,
                                            rope_stats)
from mla_jax.conversion.latent import factor_latent
from mla_jax.conversion.rope_plan import RopePlan, pair_features, plan_rope, rope_layout

REPORT_FILE = "conversion.json"


def check_source(source: ModelConfig, kv_lora_rank: int, rope_dim: int) -> None:
  """The checks that need only the source's config: raises ValueError (one line) for a source
  that is not a baseline, that has what MLA cannot hold, or a rank or RoPE width out of range."""
  if source.attention == "mla":
    raise ValueError("the source is already MLA (model.attention=mla): convert-to-mla takes "
                     "MHA, GQA or MQA models")
  if source.qkv_bias:
    raise ValueError("the source has q/k/v biases (Qwen2): DeepSeek's MLA has none, and a bias "
                     "that RoPE rotates cannot move into other weights; not supported")
  if source.rope_scaling is not None:
    raise ValueError("the source uses YaRN RoPE scaling: converting it is not supported")
  d = source.hidden_size
  if not 0 < kv_lora_rank <= d:
    raise ValueError(f"--kv-lora-rank {kv_lora_rank} is larger than possible: the latent is a "
                     f"linear function of the {d}-wide hidden state (model.hidden_size), so it "
                     f"is at most {d}" if kv_lora_rank > 0 else
                     f"--kv-lora-rank {kv_lora_rank} is invalid: must be a positive width")
  rope_layout(source, rope_dim)


def target_config(source: ModelConfig, kv_lora_rank: int, rope_dim: int, plan: RopePlan
                  ) -> ModelConfig:
  """The MLA model's config: the source's with MLA attention of the plan's shape."""
  return dataclasses.replace(
      source, attention="mla", num_kv_heads=None, qkv_bias=False, q_lora_rank=None,
      kv_lora_rank=kv_lora_rank,
      qk_nope_head_dim=source.qk_nope_head_dim + 2 * len(plan.residual_pairs),
      qk_rope_head_dim=rope_dim, qk_rope_groups=plan.groups, rope_theta=plan.theta,
      latent_norm_eps=1e-6)


def convert_attention(source: ModelConfig, target: ModelConfig, plan: RopePlan, layer: int,
                      attn: dict, norm_scale: np.ndarray, stats: Optional[LayerStats]
                      ) -> tuple[dict[str, np.ndarray], float, float]:
  """One layer's MLA weights (mla_specs' names, float64) from its baseline weights; returns
  (params, energy kept by the latent, the latent norm's scale)."""
  wq = np.asarray(attn["q_proj"], np.float64)  # [D,H,Ns+Rs]
  wk = np.asarray(attn["k_proj"], np.float64)  # [D,G,Ns+Rs]
  wv = np.asarray(attn["v_proj"], np.float64)  # [D,G,V]
  d, h, _ = wq.shape
  g = wk.shape[1]
  group = np.arange(h) // (h // g)  # query head -> its kv head
  n_s, r_s, r_t = source.qk_nope_head_dim, source.qk_rope_head_dim, target.qk_rope_head_dim
  interleave = source.rope_interleave
  features = lambda i: pair_features(n_s, r_s, i, interleave)  # noqa: E731  source pair i

  # RoPE: slot (r, j) of k_rope holds head combination A_j[r] of source pair j * stride.
  directions = plan.directions[layer]  # [m, g_r, G]
  k_rope = np.zeros((d, r_t))
  q_rope = np.zeros((d, h, r_t))
  residual_keys = {i: wk[:, :, features(i)] for i in plan.residual_pairs}  # [D,G,2] each
  for j in range(plan.pairs):
    i = j * plan.stride
    a = directions[j]  # [g_r, G]
    for r in range(plan.groups):
      slot = pair_features(0, r_t, r * plan.pairs + j, interleave)
      k_rope[:, slot] = np.einsum("g,dga->da", a[r], wk[:, :, features(i)])
      q_rope[:, :, slot] = a[r][group][None, :, None] * wq[:, :, features(i)]
    if i in residual_keys:  # what the kept combinations leave of each head's key
      residual_keys[i] = np.einsum("gh,dha->dga", np.eye(g) - a.T @ a, wk[:, :, features(i)])

  # No-RoPE: the source's own, then each residual pair unrotated (queries unchanged).
  pairs = [features(i) for i in plan.residual_pairs]
  q_nope = np.concatenate([wq[:, :, :n_s]] + [wq[:, :, f] for f in pairs], axis=-1)
  k_nope = np.concatenate([wk[:, :, :n_s]] + [residual_keys[i] for i in plan.residual_pairs],
                          axis=-1)  # [D,G,Nt]
  n_t, v = k_nope.shape[-1], wv.shape[-1]
  joint = np.concatenate([k_nope.reshape(d, g * n_t), wv.reshape(d, g * v)], axis=1)
  covariance = None if stats is None else stats.covariance / stats.tokens
  latent = factor_latent(joint, norm_scale, target.kv_lora_rank, covariance,
                         target.latent_norm_eps)
  c = target.kv_lora_rank
  up_k = latent.up[:, :g * n_t].reshape(c, g, n_t)[:, group]  # [C,H,Nt]
  up_v = latent.up[:, g * n_t:].reshape(c, g, v)[:, group]  # [C,H,V]
  scale = source.softmax_scale / target.softmax_scale  # the scores stay the source's
  params = {
      "q_proj": np.concatenate([q_nope, q_rope], axis=-1) * scale,  # [D,H,Nt+Rt]
      "kv_a_proj_with_mqa": np.concatenate([latent.down, k_rope], axis=1),  # [D,C+Rt]
      "kv_a_layernorm": {"scale": np.full(target.kv_lora_rank, latent.norm_scale)},
      "kv_b_proj": np.concatenate([up_k, up_v], axis=-1),  # [C,H,Nt+V]
      "o_proj": np.asarray(attn["o_proj"], np.float64),
  }
  return params, latent.energy_kept, latent.norm_scale


def convert_params(source: ModelConfig, params: dict, kv_lora_rank: int, rope_dim: int,
                   method: str = "mha2mla", stats: Optional[list[LayerStats]] = None
                   ) -> tuple[ModelConfig, dict, dict[str, Any]]:
  """(the MLA config, its params, the report) from a baseline model's config and params (either
  layer layout; NumPy or JAX arrays). stats: calibrate()'s per-layer sums, or None for the
  weight-only conversion. The params come back in the source's dtype and layout."""
  import jax

  from mla_jax.layers.params import unbox
  from mla_jax.model import stack_layers, unstack_layers

  check_source(source, kv_lora_rank, rope_dim)
  params = jax.device_get(unbox(params))
  if source.scan_layers:
    params = unstack_layers(source, params)
  layers = range(source.num_layers)
  per_layer = [stats[i] if stats is not None else None for i in layers]
  plan = plan_rope(method, source, rope_dim,
                   [rope_stats(source, params[f"layers_{i}"]["self_attn"], s)
                    for i, s in zip(layers, per_layer)])
  target = target_config(source, kv_lora_rank, rope_dim, plan)
  dtype = np.asarray(params["embed_tokens"]).dtype
  out = dict(params)
  rows = []
  for i, s in zip(layers, per_layer):
    block = params[f"layers_{i}"]
    attn, energy, norm = convert_attention(
        source, target, plan, i, block["self_attn"],
        np.asarray(block["input_layernorm"]["scale"], np.float64), s)
    out[f"layers_{i}"] = {**block, "self_attn": jax.tree_util.tree_map(
        lambda x: np.asarray(x, dtype), attn)}
    rows.append({"layer": i, "kv_energy_kept": energy, "rope_kept": plan.kept[i],
                 "latent_norm_scale": norm})
  if target.scan_layers:
    out = jax.tree_util.tree_map(np.asarray, stack_layers(target, out))
  source_cache = source.cache_elements_per_token_per_layer()
  target_cache = target.cache_elements_per_token_per_layer()
  report = {"method": method, "kv_lora_rank": kv_lora_rank, "rope_dim": rope_dim,
            "rope_keys": plan.groups, "rope_pair_stride": plan.stride, "rope_theta": plan.theta,
            "calibration_tokens": None if stats is None else stats[0].tokens,
            "cache_elements_per_token_per_layer": {"source": source_cache,
                                                   "target": target_cache},
            "cache_reduction": 1 - target_cache / source_cache, "layers": rows}
  return target, out, report


def report_lines(report: dict[str, Any]) -> list[str]:
  """The per-layer table and the summary `mla-jax convert-to-mla` prints."""
  cache = report["cache_elements_per_token_per_layer"]
  calibrated = (f"calibrated on {report['calibration_tokens']:,} tokens"
                if report["calibration_tokens"] else "weight-only (no calibration)")
  lines = [f"{report['method']}, {calibrated}: kv_lora_rank {report['kv_lora_rank']}, "
           f"k_rope {report['rope_dim']} ({report['rope_keys']} RoPE key(s), source pairs "
           f"0, {report['rope_pair_stride']}, {2 * report['rope_pair_stride']}, ... at "
           f"rope_theta {report['rope_theta']:g})",
           "layer  kv energy kept  RoPE score kept  latent norm scale"]
  lines += [f"{row['layer']:>5}  {row['kv_energy_kept']:>14.4f}  {row['rope_kept']:>15.4f}  "
            f"{row['latent_norm_scale']:>17.4f}" for row in report["layers"]]
  lines.append(f"KV cache per token per layer: {cache['source']} -> {cache['target']} elements "
               f"({report['cache_reduction']:.1%} smaller)")
  return lines


def _source_model_config(src: Path) -> tuple[ModelConfig, bool]:
  """(the source's ModelConfig, whether it is a Hugging Face directory) from its config file
  alone; ValueError for a path that is neither kind, or an architecture load_hf refuses."""
  from mla_jax.hf.config import model_config_from_hf
  from mla_jax.hf.llama import LLAMA_MODEL_TYPES, llama_config_from_hf
  from mla_jax.hf.safetensors import read_json
  from mla_jax.workdir import config_path, read_workdir_config

  if config_path(src).is_file():
    return read_workdir_config(src).model, False
  config_file = src / "config.json"
  if not config_file.is_file():
    raise ValueError(f"{src} is neither an mla-jax workdir (config.yaml) nor a Hugging Face "
                     "model directory (config.json)")
  hf = read_json(config_file)
  model_type = hf.get("model_type") if isinstance(hf, dict) else None
  if model_type in LLAMA_MODEL_TYPES:
    return llama_config_from_hf(hf, str(config_file)), True
  if model_type in ("deepseek_v2", "deepseek_v3"):
    return model_config_from_hf(hf, str(config_file)), True
  convertible = [t for t in LLAMA_MODEL_TYPES if t != "qwen2"]  # Qwen2's q/k/v biases: refused
  raise ValueError(f"{config_file}: model_type={model_type!r} is not supported: convert-to-mla "
                   f"takes {', '.join(convertible)} directories and mla-jax MHA/GQA/MQA "
                   "workdirs")


def convert_to_mla(src: str | Path, out: str | Path, kv_lora_rank: int, rope_dim: int,
                   method: str = "mha2mla", calibration: Optional[str] = None,
                   samples: int = 64, seq_len: int = 256,
                   log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
  """Converts the source (an mla-jax MHA/GQA/MQA workdir, or a Llama / Mistral directory) and
  writes the MLA workdir `out` (parameters only, float32; conversion.json holds the report).
  calibration: text for the activation-aware conversion (calibration_tokens' DATA), `samples`
  windows of seq_len tokens (capped at the model's max_seq_len); None for weight-only. Every
  check (source, ranks, output directory, calibration text) happens before weights are read.
  Returns the report."""
  from mla_jax import workdir as layout
  from mla_jax.checkpoint import check_writable_directory
  from mla_jax.config.run import Config, TrainConfig
  from mla_jax.hf.load import check_tokenizer, hf_eos_id, load_hf
  from mla_jax.runs import load_run
  from mla_jax.tokenizers import HFTokenizer, eos_id, find_tokenizer

  src, out = Path(src).expanduser(), Path(out)
  if method not in ("mha2mla", "transmla"):
    raise ValueError(f"--method {method!r} is not supported: allowed mha2mla, transmla")
  source, from_hf = _source_model_config(src)
  check_source(source, kv_lora_rank, rope_dim)
  check_writable_directory(out, "OUT")
  if out.exists() and any(out.iterdir()):
    raise ValueError(f"OUT {str(out)!r} already exists and is not empty; choose a new directory")
  tokenizer_file = layout.tokenizer_path(src)
  if from_hf:  # its tokenizer.json (when there) with config.json's EOS
    check_tokenizer(src, source.vocab_size)
    eos = hf_eos_id(src)
    tokenizer = HFTokenizer(tokenizer_file, eos) if tokenizer_file.is_file() else None
    missing = f"{src} has no tokenizer.json"
  else:
    tokenizer, missing = find_tokenizer(src, source.vocab_size)
    eos = eos_id(src, None)  # special_tokens.json's, for a workdir converted from Hugging Face
  windows = None
  if calibration is not None:
    if tokenizer is None:
      raise ValueError(f"--calibration needs the source's tokenizer: {missing}")
    windows = calibration_tokens(calibration, tokenizer, min(seq_len, source.max_seq_len),
                                 samples)
  if from_hf:
    model, params = load_hf(src, log=log)
    run_config = Config(model=model.config, train=TrainConfig(
        seq_len=min(TrainConfig.seq_len, model.config.max_seq_len)))
  else:
    run = load_run(src)
    run_config, params = run.config, run.params
  stats = None
  if windows is not None:
    log(f"calibrating on {windows.size:,} tokens of {calibration} ...")
    stats = calibrate(run_config.model, _unrolled(run_config.model, params), windows)
  target, converted, report = convert_params(run_config.model, params, kv_lora_rank, rope_dim,
                                             method, stats)
  report = {"source": str(src), **report}
  config = Config(model=target, train=run_config.train, data=run_config.data, mesh=run_config.mesh,
                  workdir=None, seed=run_config.seed)
  layout.write_params_workdir(
      out, config, converted, {"source": str(src), "conversion": report},
      tokenizer_file if tokenizer_file.is_file() else None, eos,
      special_tokens=from_hf or layout.special_tokens_path(src).is_file())
  (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
  return report


def _unrolled(config: ModelConfig, params: dict) -> dict:
  from mla_jax.model import unstack_layers

  return unstack_layers(config, params) if config.scan_layers else params
