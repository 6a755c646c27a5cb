"""load_hf (a Hugging Face DeepseekV2/V3 directory -> an MLA model and params; a Llama, Qwen2 or
Mistral one -> the MHA/GQA/MQA baseline) and convert_hf (-> an mla-jax workdir that `mla-jax
generate` runs). Neither imports training code or an optimizer."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from mla_jax.hf.config import SUPPORTED_MODEL_TYPES, model_config_from_hf
from mla_jax.hf.llama import LLAMA_MODEL_TYPES, llama_config_from_hf, untie_embeddings
from mla_jax.hf.safetensors import (_fp8_block, _safetensors_files, dequantize_fp8, dtype_name,
                                    read_json, read_safetensors)
from mla_jax.hf.tensors import params_from_hf

if TYPE_CHECKING:
  from mla_jax.model import Transformer


def _note(message: str) -> None:
  print(f"note: {message}", file=sys.stderr)


def load_hf(path: str | Path, dtype: Any = np.float32, mesh: Any = None,
            log: Callable[[str], None] = _note) -> tuple["Transformer", dict[str, Any]]:
  """(model, params) from a local Hugging Face directory (config.json and *.safetensors, with or
  without an index): DeepseekV2/V3 as MLA, Llama / Qwen2 / Mistral as the MHA/GQA/MQA baseline
  (mla_jax/hf/llama.py). dtype (float32, bfloat16 or float16, as a dtype, a name or an alias
  such as "bf16") applies to activations and parameters.

  With a mesh, each tensor is converted and placed on its devices (sharded as the tables in
  mla_jax.sharding say) as soon as it is read, so the whole model never sits on one device.
  DeepSeek-V3's multi-token-prediction layers (num_nextn_predict_layers) load as the model's
  MTP modules (model.num_mtp_layers; mla_jax/mtp.py), the drafts of speculative decoding; when
  config.json announces them and the files hold none of their tensors (some redistributions drop
  them), the model loads without them and a one-line note to `log` (default: stderr) says so.
  Errors: ValueError naming the file, field or tensor.
  """
  import jax
  import jax.numpy as jnp
  from mla_jax.model import Transformer
  from mla_jax.sharding import tree_shardings

  name = dtype_name(dtype)
  directory = Path(path).expanduser()
  config_file = directory / "config.json"
  if not config_file.is_file():
    raise ValueError(f"{directory} is not a Hugging Face model directory: no config.json")
  hf_config = read_json(config_file)
  model_type = hf_config.get("model_type") if isinstance(hf_config, dict) else None
  llama = model_type in LLAMA_MODEL_TYPES
  if isinstance(hf_config, dict) and not llama and model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"{config_file}: model_type={model_type!r} is not supported: allowed "
                     f"{', '.join(SUPPORTED_MODEL_TYPES + LLAMA_MODEL_TYPES)}")
  if llama:
    config = llama_config_from_hf(hf_config, str(config_file), log, dtype=name, param_dtype=name)
  else:
    config = model_config_from_hf(hf_config, str(config_file), dtype=name, param_dtype=name)
  tensors: dict[str, np.ndarray] = {}
  for file in _safetensors_files(directory):
    tensors.update(_float_tensors(file, read_safetensors(file)))
  tensors = dequantize_fp8(tensors, _fp8_block(hf_config, str(config_file)), str(directory))
  if llama:
    tensors = untie_embeddings(hf_config, tensors)
  first_mtp = f"model.layers.{config.num_layers}."
  if config.num_mtp_layers and not any(name.startswith(first_mtp) for name in tensors):
    log(f"config.json announces {config.num_mtp_layers} multi-token-prediction layer(s) "
        f"(num_nextn_predict_layers) but the checkpoint holds no {first_mtp}* tensor: loaded "
        "without them, so the model cannot draft for speculative decoding")
    config = dataclasses.replace(config, num_mtp_layers=0)

  def place(param_path: tuple[str, ...], array: np.ndarray):
    router = param_path[-1] in ("gate", "e_score_correction_bias")  # float32, as DeepSeek keeps it
    array = array.astype(jnp.float32 if router else jnp.dtype(name))
    if mesh is None:
      return jnp.asarray(array)
    nested = array
    for key in reversed(param_path):  # {"layers_0": {...: array}}: the path names the axes
      nested = {key: nested}
    sharding = jax.tree_util.tree_leaves(tree_shardings(nested, mesh))[0]  # checks divisibility
    return jax.device_put(array, sharding)

  params = params_from_hf(config, tensors, place=place, log=log)
  return Transformer(config), params


def _float_tensors(file: Path, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The tensors of one file, all floating point (FP8 included). Raises ValueError naming the
  first integer or boolean one: a model's weights are never integers, and converting them would
  silently turn stored codes into values (a quantized checkpoint needs its own dequantizer)."""
  for name, tensor in tensors.items():
    dtype = np.dtype(tensor.dtype)
    if dtype.kind in "biu":  # bfloat16 and FP8 (ml_dtypes) are kind "V"
      raise ValueError(f"tensor {name} in {file} has integer dtype {dtype.name}: "
                       "mla-jax converts floating-point weights (float32, bfloat16, float16, FP8 "
                       "with scales); give the model's unquantized safetensors")
  return tensors


def hf_eos_id(directory: Path) -> int | None:
  """config.json's eos_token_id when it is one integer, else None."""
  eos = read_json(Path(directory) / "config.json").get("eos_token_id")
  return eos if isinstance(eos, int) and not isinstance(eos, bool) else None


def check_tokenizer(directory: Path, vocab_size: int) -> None:
  """Raises ValueError naming the source's tokenizer.json when it is not JSON, not a tokenizer
  the tokenizers library reads, or has token ids beyond the model's vocab_size (they would index
  past the embedding table)."""
  from mla_jax import workdir as layout
  from mla_jax.tokenizers import HFTokenizer

  path = layout.tokenizer_path(directory)
  if not path.is_file():
    return
  read_json(path)  # names the file and the position when it is not JSON
  tokenizer = HFTokenizer(path, eos_id=None)._tokenizer
  ids = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
  if ids > vocab_size:
    raise ValueError(f"{path} has token ids up to {ids - 1}, beyond the model's vocab_size="
                     f"{vocab_size} (ids 0..{vocab_size - 1}): it is another model's tokenizer; "
                     "copy the one from this model's repository")


def convert_hf(source: str | Path, workdir: str | Path, dtype: str = "float32",
               log: Callable[[str], None] = _note) -> Path:
  """Writes a Hugging Face DeepseekV2/V3 (or Llama, Qwen2, Mistral) directory as an mla-jax
  workdir that `mla-jax generate` runs: config.yaml, an orbax checkpoint of the parameters,
  special_tokens.json (the EOS id) and tokenizer.json when the source has one. Without one, `log` says so, and `generate` refuses
  text prompts on the workdir until a tokenizer.json is copied there (token ids still work)."""
  from mla_jax import workdir as layout
  from mla_jax.checkpoint import check_writable_directory
  from mla_jax.config.run import Config, TrainConfig

  workdir = Path(workdir)
  check_writable_directory(workdir, "--out")
  if layout.checkpoints_dir(workdir).exists():
    raise ValueError(f"--out {str(workdir)!r} already holds checkpoints; choose a new directory")
  model, params = load_hf(source, dtype=dtype, log=log)  # every check happens before writing
  directory = Path(source).expanduser()
  check_tokenizer(directory, model.config.vocab_size)
  eos = hf_eos_id(directory)
  # The workdir's train section is unused by generate, but must be valid for this model.
  train = TrainConfig(seq_len=min(TrainConfig.seq_len, model.config.max_seq_len))
  config = Config(model=model.config, train=train, workdir=str(workdir))
  tokenizer = layout.tokenizer_path(directory)  # the same file name in both directories
  layout.write_params_workdir(workdir, config, params, {"source": str(source),
                                                        "eos_token_id": eos},
                              tokenizer if tokenizer.is_file() else None, eos)
  if not tokenizer.is_file():
    log(f"no tokenizer.json in {directory}: `mla-jax generate` will refuse text prompts on "
        f"{workdir} until you copy the model's tokenizer.json there")
  return workdir
