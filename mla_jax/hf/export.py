"""mla-jax -> a Hugging Face DeepseekV2/V3 directory: save_hf, and `mla-jax export` (export_run).

The directory is what transformers' save_pretrained writes for DeepSeek, so transformers, vLLM and
SGLang load it: config.json, model.safetensors (or shards of at most max_shard_size with
model.safetensors.index.json), generation_config.json, and the tokenizer (tokenizer.json with a
tokenizer_config.json) when the run has one. The tensors are load_hf's map run backwards
(hf/tensors.py: hf_tensors_from_params), so loading the export gives the same arrays bit for bit.

Which family: DeepseekV3 (transformers' class takes both RoPE layouts, rope_interleave) unless
the model routes its experts with softmax, which only DeepseekV2 computes; V2 rotates
interleaved pairs, so a half-rotation model's RoPE features are permuted into that layout on
the way out (the same function; loading it back gives the permuted arrays). Models no DeepSeek
config expresses are refused before anything is written: the MHA/GQA/MQA baselines, k_rope in
several groups (model.qk_rope_groups > 1), latent norms with another epsilon than DeepSeek's 1e-6.
A model's multi-token-prediction modules (model.num_mtp_layers) are written as DeepSeek-V3 does:
num_nextn_predict_layers, and `model.layers.{num_layers + k}.*` with its copies of the embedding
and the output head (entries of the same tensor map).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from mla_jax.config.model import ModelConfig
from mla_jax.hf.safetensors import dtype_name, write_safetensors
from mla_jax.hf.tensors import hf_tensors_from_params

INDEX_FILE = "model.safetensors.index.json"
_ROUTER = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")  # float32, as DeepSeek keeps


def deepseek_family(config: ModelConfig) -> str:
  """'deepseek_v3', or 'deepseek_v2' for softmax-routed experts. Raises ValueError (one line)
  for a model no DeepSeek config expresses."""
  if config.attention != "mla":
    raise ValueError(f"model.attention={config.attention}: a DeepSeek checkpoint holds MLA "
                     "attention only, and the MHA, GQA and MQA baselines (Llama, Qwen2, Mistral "
                     "models) have no DeepSeek config; convert the model to MLA first with "
                     "`mla-jax convert-to-mla`")
  if config.qk_rope_groups != 1:
    raise ValueError(f"model.qk_rope_groups={config.qk_rope_groups}: DeepSeek's MLA has one "
                     "shared RoPE key; convert again with --rope-dim of one kv head's RoPE "
                     "width or less")
  if config.latent_norm_eps != 1e-6:
    raise ValueError(f"model.latent_norm_eps={config.latent_norm_eps}: DeepSeek's latent norms "
                     "use an epsilon of 1e-6, which config.json cannot change")
  softmax_moe = config.n_routed_experts is not None and config.scoring_func == "softmax"
  return "deepseek_v2" if softmax_moe else "deepseek_v3"


def hf_config(config: ModelConfig, dtype: str, bos_token_id: Optional[int] = None,
              eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None
              ) -> dict[str, Any]:
  """The config.json of the export: every field transformers' DeepseekV2/V3 reads, plus the
  ones DeepSeek's own configs carry for other engines (scoring_func, moe_layer_freq, ...)."""
  family = deepseek_family(config)
  c = config
  rope_theta = float(c.rope_theta)
  out: dict[str, Any] = {
      "architectures": ["DeepseekV3ForCausalLM" if family == "deepseek_v3"
                        else "DeepseekV2ForCausalLM"],
      "model_type": family, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_heads,
      "q_lora_rank": c.q_lora_rank, "kv_lora_rank": c.kv_lora_rank,
      "qk_nope_head_dim": c.qk_nope_head_dim, "qk_rope_head_dim": c.qk_rope_head_dim,
      "v_head_dim": c.v_head_dim, "hidden_act": "silu",
      "max_position_embeddings": c.max_seq_len, "initializer_range": c.initializer_range,
      "rms_norm_eps": c.rms_norm_eps, "rope_theta": rope_theta,
      "rope_interleave": True if family == "deepseek_v2" else c.rope_interleave,
      "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
      "use_cache": True, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
      "pad_token_id": pad_token_id, "torch_dtype": dtype, "dtype": dtype,
      "num_nextn_predict_layers": c.num_mtp_layers, "moe_layer_freq": 1, "ep_size": 1,
  }
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
  if c.rope_scaling is not None:
    y = c.rope_scaling
    yarn = {"factor": y.factor, "original_max_position_embeddings":
            y.original_max_position_embeddings, "beta_fast": y.beta_fast,
            "beta_slow": y.beta_slow, "mscale": y.mscale, "mscale_all_dim": y.mscale_all_dim}
    rope = {"rope_type": "yarn", "rope_theta": rope_theta, **yarn}
    out["rope_scaling"] = {"type": "yarn", **yarn}  # the legacy field other engines read
  out["rope_parameters"] = rope
  if c.n_routed_experts is None:  # every layer dense: no layer reaches first_k_dense_replace
    # (transformers' config insists on integers for the expert fields, used by no layer here)
    out.update(n_routed_experts=1, n_shared_experts=0, num_experts_per_tok=1,
               first_k_dense_replace=c.num_layers, moe_intermediate_size=c.intermediate_size,
               n_group=1, topk_group=1)
  else:
    out.update(
        n_routed_experts=c.n_routed_experts, n_shared_experts=c.n_shared_experts,
        num_experts_per_tok=c.num_experts_per_tok, moe_intermediate_size=c.moe_intermediate_size,
        first_k_dense_replace=c.first_k_dense_replace, n_group=c.n_group,
        topk_group=c.topk_group, norm_topk_prob=c.norm_topk_prob, scoring_func=c.scoring_func,
        topk_method=c.topk_method, routed_scaling_factor=c.routed_scaling_factor,
        aux_loss_alpha=c.aux_loss_alpha, seq_aux=True)
  return out


def _interleave_rope(config: ModelConfig, tensors: dict[str, np.ndarray]) -> None:
  """Half-rotation RoPE features -> DeepSeek-V2's interleaved pairs, in place: feature 2j takes
  x_j and 2j+1 takes x_{j+R/2} in the query's and the shared key's RoPE parts."""
  c = config
  r, n, k = c.qk_rope_head_dim, c.qk_nope_head_dim, c.qk_head_dim
  perm = np.stack([np.arange(r // 2), np.arange(r // 2) + r // 2], -1).reshape(-1)
  for name, tensor in tensors.items():
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
      heads = tensor.reshape(c.num_heads, k, -1)  # rows: [H*(N+R), in]
      heads[:, n:] = heads[:, n:][:, perm]
    elif name.endswith("self_attn.kv_a_proj_with_mqa.weight"):  # rows: [C+R, D]
      tensor[c.kv_lora_rank:] = tensor[c.kv_lora_rank:][perm]


def parse_size(text: str) -> int:
  """'5GB' -> 5 * 10**9 bytes, '500MiB' -> 500 * 2**20 (units B, KB, MB, GB, KiB, MiB, GiB,
  case-insensitive); ValueError naming --max-shard-size otherwise."""
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?\s*", str(text).lower())
  if not match or float(match.group(1)) <= 0:
    raise ValueError(f"--max-shard-size {text!r} is invalid: expected a positive size such as "
                     "5GB, 500MB or 2GiB")
  unit = match.group(2) or ""
  scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
  return int(float(match.group(1)) * scale[unit])


def _shards(tensors: Mapping[str, np.ndarray], max_bytes: int) -> list[list[str]]:
  """Consecutive groups of tensor names of at most max_bytes each (a larger tensor alone)."""
  shards: list[list[str]] = [[]]
  size = 0
  for name, tensor in tensors.items():
    nbytes = tensor.nbytes
    if shards[-1] and size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  return shards


def check_new_directory(directory: Path) -> None:
  """Refuses an output path that exists (other than as an empty directory) or whose parent
  cannot be written, before any work."""
  directory = Path(directory)
  if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
    raise ValueError(f"{directory} already exists and is not an empty directory; choose a new "
                     "output directory")
  parent = directory.resolve().parent
  if not parent.is_dir() or not os.access(parent, os.W_OK):
    raise ValueError(f"cannot write {directory}: its parent {parent} is not a writable directory")


def save_hf(model: Any, params: Any, directory: str | Path, *, dtype: Any = None,
            max_shard_size: str | int = "5GB", tokenizer_json: Optional[str] = None,
            bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None,
            pad_token_id: Optional[int] = None) -> Path:
  """Writes (model, params) as a Hugging Face DeepseekV2/V3 directory; `model` is a Transformer
  or its ModelConfig, params its tree (either layer layout, arrays on any device).

  dtype: float32, bfloat16 or float16 for the weights (None: the parameters' own), the router
  kept in float32. max_shard_size: bytes per safetensors file ("5GB", "500MiB" or an int); one
  file (model.safetensors, no index) when everything fits. tokenizer_json: a tokenizer.json's
  text, written with a tokenizer_config.json naming the special tokens. The directory is written
  beside its final place and renamed there, so a failure leaves nothing half-written. Raises
  ValueError (before writing) for a model no DeepSeek config expresses, params of another model,
  an existing non-empty directory or a bad size. Returns the directory.
  """
  import jax
  import ml_dtypes

  config = model if isinstance(model, ModelConfig) else model.config
  family = deepseek_family(config)
  directory = Path(directory)
  check_new_directory(directory)
  max_bytes = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size)
  tensors = hf_tensors_from_params(config, jax.device_get(params))
  name = dtype_name(dtype) if dtype is not None else dtype_name(
      tensors["model.embed_tokens.weight"].dtype)
  target = np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
  tensors = {k: v.astype(np.float32 if k.endswith(_ROUTER) else target, copy=False)
             for k, v in tensors.items()}
  if family == "deepseek_v2" and not config.rope_interleave:
    _interleave_rope(config, tensors)
  config_json = hf_config(config, name, bos_token_id, eos_token_id, pad_token_id)
  directory.resolve().parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.resolve().parent))
  try:
    _write(staging, tensors, max_bytes, config_json, tokenizer_json)
    if directory.exists():
      directory.rmdir()  # empty, as checked
    os.replace(staging, directory)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return directory


def _write(directory: Path, tensors: dict[str, np.ndarray], max_bytes: int,
           config_json: dict[str, Any], tokenizer_json: Optional[str]) -> None:
  shards = _shards(tensors, max_bytes)
  if len(shards) == 1:
    write_safetensors(directory / "model.safetensors", tensors)
  else:
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
      file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      total += write_safetensors(directory / file, {n: tensors[n] for n in names})
      weight_map.update(dict.fromkeys(names, file))
    (directory / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  (directory / "config.json").write_text(json.dumps(config_json, indent=2))
  generation = {key: config_json[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
                if config_json[key] is not None}
  (directory / "generation_config.json").write_text(json.dumps(
      {**generation, "_from_model_config": True}, indent=2))
  if tokenizer_json is not None:
    (directory / "tokenizer.json").write_text(tokenizer_json)
    (directory / "tokenizer_config.json").write_text(json.dumps(
        _tokenizer_config(tokenizer_json, config_json), indent=2))


def _tokenizer_config(tokenizer_json: str, config_json: dict[str, Any]) -> dict[str, Any]:
  """tokenizer_config.json for transformers' AutoTokenizer: the fast tokenizer class and the
  spelling of each special token id the config names."""
  from tokenizers import Tokenizer

  tokenizer = Tokenizer.from_str(tokenizer_json)
  out: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                         "model_max_length": config_json["max_position_embeddings"],
                         "clean_up_tokenization_spaces": False}
  for role in ("bos", "eos", "pad"):
    token_id = config_json[f"{role}_token_id"]
    text = None if token_id is None else tokenizer.id_to_token(token_id)
    if text is not None:
      out[f"{role}_token"] = text
  return out


def export_run(workdir: str | Path, out: str | Path, dtype: str = "auto",
               max_shard_size: str = "5GB", log: Callable[[str], None] = lambda _: None) -> Path:
  """`mla-jax export`: the latest checkpoint of a workdir (from `mla-jax train`, `convert` or
  `convert-to-mla`) as a Hugging Face DeepseekV2/V3 directory. The tokenizer goes along: the
  workdir's tokenizer.json, or for a model trained on bytes mla-jax's byte tokenizer written as
  one (mla_jax.tokenizers.byte_tokenizer_json). Every check (the model's family, the output
  path, the size) happens before the checkpoint is read."""
  from mla_jax import workdir as layout
  from mla_jax.runs import load_run
  from mla_jax.tokenizers import ByteTokenizer, byte_tokenizer_json

  config = layout.read_workdir_config(workdir).model
  deepseek_family(config)
  check_new_directory(Path(out))
  size = parse_size(max_shard_size)
  dtype = None if dtype == "auto" else dtype_name(dtype)
  run = load_run(workdir)
  ids: dict[str, Optional[int]] = {"eos_token_id": run.eos_id}
  tokenizer_json = None
  if isinstance(run.tokenizer, ByteTokenizer):
    tokenizer_json = byte_tokenizer_json()
    ids.update(bos_token_id=ByteTokenizer.BOS, pad_token_id=ByteTokenizer.PAD)
  elif run.tokenizer is not None:
    tokenizer_json = layout.tokenizer_path(workdir).read_text()
  else:
    log(f"{workdir} has no tokenizer: {out} gets none (prompt it with token ids)")
  directory = save_hf(run.config.model, run.params, out, dtype=dtype, max_shard_size=size,
                      tokenizer_json=tokenizer_json, **ids)
  log(f"{deepseek_family(config)} checkpoint of step {run.step}")
  return directory
