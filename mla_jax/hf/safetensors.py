"""Reading and writing a Hugging Face checkpoint's files: JSON, safetensors (memory-mapped,
bfloat16 and FP8 included), FP8 block dequantization, and the dtype names mla-jax accepts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mla_jax.config.model import DTYPES, dtype_to_name


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                      "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}
_DAMAGED = "the file is truncated or damaged; download it again"


def read_json(path: Path) -> Any:
  """A JSON file's contents; unreadable JSON is a ValueError naming the file and the position."""
  try:
    return json.loads(Path(path).read_bytes())
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    where = (f" ({err.msg} at line {err.lineno} column {err.colno})"
             if isinstance(err, json.JSONDecodeError) else "")
    raise ValueError(f"{path} is not valid JSON{where}: {_DAMAGED}") from None


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
  """Memory-maps a .safetensors file: tensors are read from disk only when converted.

  Hand-written over the documented format (8-byte header size, JSON header, raw data) because
  the safetensors package's numpy backend cannot return bfloat16, DeepSeek's dtype, and its flax
  backend puts every tensor on the default device. The header is checked against the file's size
  first, so a truncated or damaged file is a ValueError naming it (and the tensor), never a
  reshape error. FP8 tensors (DeepSeek's released V3/R1 files) come back as stored, in
  ml_dtypes' float8 types; see dequantize_fp8.
  """
  import ml_dtypes

  path = Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    header_size = int.from_bytes(head, "little") if len(head) == 8 else -1
    if header_size < 0 or 8 + header_size > size:
      raise ValueError(f"{path} is not a complete safetensors file ({size:,} bytes, shorter than "
                       f"the header it announces): {_DAMAGED}")
    try:
      header = json.loads(f.read(header_size))
    except (json.JSONDecodeError, UnicodeDecodeError):
      header = None
  if not isinstance(header, dict):
    raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object; "
                     f"{_DAMAGED}")
  data_size = size - 8 - header_size
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size) if data_size else None
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    kind = info.get("dtype") if isinstance(info, dict) else None
    dtype = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
             "F8_E5M2": ml_dtypes.float8_e5m2}.get(kind) or _SAFETENSORS_DTYPES.get(kind)
    if dtype is None:
      raise ValueError(f"tensor {name} in {path} has unsupported dtype {kind}")
    try:
      shape = tuple(int(n) for n in info["shape"])
      begin, end = (int(n) for n in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{path}: the header entry of tensor {name} is malformed; "
                       f"{_DAMAGED}") from None
    if end - begin != math.prod(shape) * np.dtype(dtype).itemsize or begin < 0:
      raise ValueError(f"{path}: tensor {name} of shape {shape} and dtype {kind} does not fit its "
                       f"byte range [{begin}, {end}); {_DAMAGED}")
    if end > data_size:
      raise ValueError(f"{path} is truncated: tensor {name} needs data bytes [{begin:,}, {end:,}) "
                       f"but the file holds {data_size:,}; download it again")
    tensors[name] = (np.zeros(shape, dtype) if data is None else
                     data[begin:end].view(dtype).reshape(shape))
  return tensors


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> int:
  """Writes tensors (float32, float16, bfloat16, in the given order) as one .safetensors file in
  the documented format read_safetensors reads: 8-byte little-endian header size, the JSON
  header padded with spaces to 8 bytes, the raw little-endian data; metadata {"format": "pt"} as
  transformers' save_pretrained writes it. Returns the data's size in bytes. Raises ValueError
  naming a tensor of another dtype."""
  import ml_dtypes

  names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
           np.dtype(ml_dtypes.bfloat16): "BF16"}
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, tensor in tensors.items():
    kind = names.get(np.dtype(tensor.dtype))
    if kind is None:
      raise ValueError(f"tensor {name} has dtype {np.dtype(tensor.dtype).name}: the export writes "
                       "float32, float16 or bfloat16")
    size = int(np.prod(tensor.shape, dtype=np.int64)) * np.dtype(tensor.dtype).itemsize
    header[name] = {"dtype": kind, "shape": list(tensor.shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)
  with open(path, "wb") as f:
    f.write(len(encoded).to_bytes(8, "little"))
    f.write(encoded)
    for tensor in tensors.values():
      f.write(np.ascontiguousarray(tensor).tobytes())  # native order: little-endian hosts
  return offset


class _BlockDequantized:
  """An FP8 weight [M,N] times its per-block scales [ceil(M/bm), ceil(N/bn)], computed only when
  read (np.asarray), so memory-mapped files stay unread until converted. As DeepSeek-V3's
  inference/kernel.py weight_dequant (y = x * s per block) and fp8_cast_bf16.py (to bfloat16)."""

  def __init__(self, weight: np.ndarray, scale: np.ndarray, block: tuple[int, int]):
    self.weight, self.scale, self.block = weight, scale, block
    self.shape = weight.shape

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    import ml_dtypes

    (bm, bn), (m, n) = self.block, self.shape
    scale = np.repeat(np.repeat(np.asarray(self.scale, np.float32), bm, 0), bn, 1)[:m, :n]
    out = (np.asarray(self.weight).astype(np.float32) * scale).astype(ml_dtypes.bfloat16)
    return out if dtype is None else out.astype(dtype)


def dequantize_fp8(tensors: Mapping[str, Any], block: tuple[int, int] = (128, 128),
                   source: str = "the checkpoint") -> dict[str, Any]:
  """Replaces each FP8 `X.weight` and its `X.weight_scale_inv` (DeepSeek's released V3/R1 layout,
  block-wise scales, config.json's quantization_config.weight_block_size) by the dequantized
  bfloat16 weight, lazily. An FP8 weight without scales, scales without their weight, or scales
  of the wrong shape are ValueErrors naming the tensor."""
  import ml_dtypes

  fp8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
  out = {name: t for name, t in tensors.items() if not name.endswith(".weight_scale_inv")}
  for name in sorted(set(tensors) - set(out)):
    weight_name = name[:-len("_scale_inv")]
    weight = tensors.get(weight_name)
    if weight is None or np.dtype(weight.dtype) not in fp8 or len(weight.shape) != 2:
      raise ValueError(f"{source}: {name} has no FP8 matrix {weight_name} to scale")
    (m, n), (bm, bn) = weight.shape, block
    expected = (-(-m // bm), -(-n // bn))
    if tuple(tensors[name].shape) != expected:
      raise ValueError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, expected "
                       f"{expected} (blocks of {bm}x{bn} over {weight_name} {(m, n)})")
    out[weight_name] = _BlockDequantized(weight, tensors[name], block)
  unscaled = sorted(name for name, t in out.items()
                    if isinstance(t, np.ndarray) and t.dtype in fp8)
  if unscaled:
    raise ValueError(f"{source}: FP8 tensors without their weight_scale_inv: {unscaled[:5]}"
                     f"{' ...' if len(unscaled) > 5 else ''} ({len(unscaled)} in all)")
  return out


def _fp8_block(hf: Mapping[str, Any], source: str) -> tuple[int, int]:
  """quantization_config.weight_block_size of an FP8 config.json ([128, 128] for DeepSeek-V3)."""
  quant = hf.get("quantization_config") or {}
  block = quant.get("weight_block_size", [128, 128]) if isinstance(quant, Mapping) else None
  if (not isinstance(block, (list, tuple)) or len(block) != 2
      or not all(isinstance(b, int) and b > 0 for b in block)):
    raise ValueError(f"{source}: quantization_config.weight_block_size={block!r} is invalid: "
                     "expected two positive integers, e.g. [128, 128]")
  return int(block[0]), int(block[1])


def _safetensors_files(directory: Path) -> list[Path]:
  index = directory / "model.safetensors.index.json"
  if index.is_file():
    weight_map = read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index} has no \"weight_map\" object: {_DAMAGED}")
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
      raise ValueError(f"{index} names shard files that are not there: {missing}")
    return [directory / n for n in names]
  files = sorted(directory.glob("*.safetensors"))
  if not files:
    raise ValueError(f"{directory} holds no *.safetensors file")
  return files


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32", "float": "float32",
                  "fp16": "float16", "f16": "float16", "half": "float16"}


def dtype_name(dtype: Any) -> str:
  """'float32', 'bfloat16' or 'float16' from a dtype, its name or a common alias (bf16, fp32,
  fp16, ...); anything else is a ValueError listing what is allowed."""
  if isinstance(dtype, str):
    name = _DTYPE_ALIASES.get(dtype.strip().lower(), dtype.strip().lower())
  else:
    name = dtype_to_name(dtype)
  if name not in DTYPES:
    raise ValueError(f"dtype={dtype!r} is not supported: allowed {', '.join(DTYPES)} "
                     "(or bf16, fp32, fp16)")
  return name
