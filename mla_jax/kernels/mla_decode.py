"""Pallas MLA decode kernels (FlashMLA-style) behind the flash-decoding signatures.

`mla_decode_partials` and `paged_mla_decode_partials` take exactly the arguments of their XLA
counterparts in layers/flash_decode.py and layers/paged_attention.py and return the same
partials (m, l [B,T,H], acc [B,T,H,C], float32), so the layer, the sequence-sharded combine
(split_over_sequence) and normalize use either. What differs is how a block is read: in one
kernel program all heads' absorbed queries (T*H rows, T >= 1 new tokens) meet each latent block
once, for both the scores (latent and RoPE parts) and the weighted sum (mla_decode_block.py
has the math), with each sequence's own early stop.

Backends: Mosaic on TPU (mla_decode_tpu.py: hand double-buffered DMAs, the page table as
scalar prefetch) and Triton on GPU (mla_decode_gpu.py: masked and gathered loads, the loop
software-pipelined). Triton rather than Mosaic GPU: the installed JAX lowers both, but Triton
runs on every CUDA GPU since Ampere (Mosaic GPU wants Hopper or newer), and its masked and
gathered loads express the early stop and the page walk directly. On CPU there is no kernel
backend; the TPU kernel runs in Pallas' TPU interpret mode, which simulates its memory spaces,
DMAs and semaphores (for tests; it is not fast). The platform is the default backend's, or the
one set with `kernel_platform` (to lower for a device this machine lacks, e.g. for jax.export).

Split-KV: with num_splits > 1 the blocks each sequence holds are shared among that many
programs, each returning its partials; they are merged with the exact log-sum-exp combine
(flash_decode.merge_splits), so the result does not depend on the split beyond float rounding.
It gives a small batch more programs than sequences (a GPU's SMs, a TPU's cores).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp

from mla_jax.cache import (dequantize_block, interleave, latent_planes, value_dtype,
                           value_view)
from mla_jax.layers.flash_decode import Partials, merge_splits
from mla_jax.kernels import mla_decode_gpu, mla_decode_tpu
from mla_jax.kernels.mla_decode_block import Queries, compute_dtype

# Tokens per kernel block when model.decode_kernel_block_size is null. Starting points from
# the memory each block takes, not from timings (none were possible where they were set):
# TPU, 512 rows of the latent (0.5 MiB at bfloat16, double-buffered well inside VMEM); GPU,
# 64 rows, so the double-buffered latent tile (2 x 64 x 512 x 2 bytes) stays well inside an
# SM's shared memory beside the queries. `mla-jax bench decode --kernel pallas
# --block-sizes tune` measures the candidates on the machine it runs on and names the best.
DEFAULT_BLOCK_SIZES = {"tpu": 512, "gpu": 64}
PLATFORMS = ("tpu", "gpu")
GPU_MAX_BLOCK_Q = 32  # query rows per GPU program: a 32 x C float32 accumulator in registers

_PLATFORM = contextvars.ContextVar("mla_jax_kernel_platform", default=None)


@contextlib.contextmanager
def kernel_platform(platform: str) -> Iterator[None]:
  """Within the block, the kernels are traced for `platform` ('tpu' or 'gpu') and not
  interpreted, whatever the default backend: for lowering a decode step with jax.export for a
  device this machine does not have. JAX's trace caches are cleared on entry and exit, since a
  jitted function traced for one platform would otherwise be reused for the other. Raises
  ValueError for another platform."""
  _check_platform(platform)
  jax.clear_caches()
  token = _PLATFORM.set(platform)
  try:
    yield
  finally:
    _PLATFORM.reset(token)
    jax.clear_caches()


def target_platform() -> str:
  """'tpu', 'gpu' or 'cpu': the kernel_platform in force, else the default backend's."""
  chosen = _PLATFORM.get()
  if chosen is not None:
    return chosen
  backend = jax.default_backend()
  return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def uses_pallas(decode_kernel: str) -> bool:
  """Whether model.decode_kernel ('auto', 'xla' or 'pallas') runs these kernels here: 'auto'
  does on TPU and GPU, not on CPU (where they can only be interpreted)."""
  if decode_kernel == "auto":
    return target_platform() in PLATFORMS
  return decode_kernel == "pallas"


def default_block_size(platform: Optional[str] = None) -> int:
  """The kernel's tokens per block on `platform` (default: target_platform(); on CPU, the TPU
  kernel's, which is what runs interpreted there)."""
  platform = platform or target_platform()
  return DEFAULT_BLOCK_SIZES.get(platform, DEFAULT_BLOCK_SIZES["tpu"])


def _check_platform(platform) -> None:
  if platform not in PLATFORMS:
    raise ValueError(f"platform={platform!r} is invalid: the MLA decode kernel exists for "
                     f"{', '.join(PLATFORMS)} (None: the default backend's)")


def _positive(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{name}={value!r} is invalid: must be a positive integer")


def _power_of_two(name: str, value: int, what: str) -> None:
  if value < 16 or value & (value - 1):
    raise ValueError(f"{name}={value} is invalid for the GPU (Triton) decode kernel: {what} "
                     "must be a power of 2 >= 16 (Triton loads power-of-2 shapes and its dots "
                     "are at least 16 wide)")


def mla_decode_partials(q_lat: jax.Array, q_rope: jax.Array, c_kv: Any, k_rope: jax.Array,
                        kv_lengths: jax.Array, positions: jax.Array, *, scale: float,
                        block_size: Optional[int] = None,
                        dequantize: Optional[Callable[[Any], jax.Array]] = None,
                        num_splits: int = 1, platform: Optional[str] = None,
                        interpret: Optional[bool] = None) -> Partials:
  """layers.flash_decode.mla_decode_partials as a Pallas kernel: (m, l [B,T,H], acc
  [B,T,H,C]) float32 over a contiguous latent cache.

  q_lat [B,T,H,C]; q_rope [B,T,H,R]; c_kv [B,S,C] float32 or bfloat16 (or its uint16 bits, as
  LatentCache stores it), or a quantized latent as latent_operand gives it, {"values": int8
  [B,S,C] or packed int4 uint8 [B,S,C/2], "scale": float32 [B,S,1]} with dequantize =
  cache.dequantize_block (decoded in the kernel); k_rope [B,S,R]; kv_lengths [B]; positions
  [B,T]; scale: the softmax scale. block_size: tokens per kernel block (None: the platform's
  default); num_splits: programs per sequence (split-KV). platform 'tpu' | 'gpu' (None:
  target_platform(), the TPU kernel on CPU); interpret: run in Pallas interpret mode (None: on
  CPU only; for the TPU kernel also a pltpu.InterpretParams). Raises ValueError for a block
  size, split count or platform that is invalid, a shape the GPU kernel cannot load, or a
  dequantize other than the cache codec's.
  """
  platform, interpret, block_size = _resolve(platform, interpret, block_size, num_splits)
  seq = k_rope.shape[1]
  if platform == "tpu":
    blk = min(block_size, seq)
    if blk < seq and blk % 8:
      raise ValueError(f"block_size={block_size} (model.decode_kernel_block_size) is invalid "
                       "for the TPU decode kernel: a block shorter than the cache must be a "
                       "multiple of 8 rows (the sublane tile)")
    source = mla_decode_tpu.Contiguous(blk=blk, seq=seq)
  else:
    _power_of_two("block_size (model.decode_kernel_block_size)", block_size, "a block")
    source = mla_decode_gpu.Contiguous(blk=block_size)
  return _partials(q_lat, q_rope, c_kv, k_rope, kv_lengths, positions, None, scale=scale,
                   dequantize=dequantize, source=source, splits=num_splits, platform=platform,
                   interpret=interpret)


def paged_mla_decode_partials(q_lat: jax.Array, q_rope: jax.Array, c_kv: Any, k_rope: jax.Array,
                              page_table: jax.Array, kv_lengths: jax.Array, positions: jax.Array,
                              *, scale: float, pages_per_block: int,
                              dequantize: Optional[Callable[[Any], jax.Array]] = None,
                              num_splits: int = 1, platform: Optional[str] = None,
                              interpret: Optional[bool] = None) -> Partials:
  """layers.paged_attention.paged_mla_decode_partials as a Pallas kernel: (m, l [B,T,H], acc
  [B,T,H,C]) float32 over a paged latent cache.

  c_kv the latent pool [P,page,C] (or {"values" [P,page,C or C/2], "scale" [P,page,1]} with
  dequantize = cache.dequantize_block); k_rope [P,page,R]; page_table [B,M] int32 (entries past
  a sequence's pages may be anything, e.g. NO_PAGE: they are never read into a result);
  pages_per_block: table entries per kernel block (at most the table's M are used: no block
  needs more than a sequence can hold; on GPU, at most the largest power of 2 <= M). The rest as
  mla_decode_partials. Raises ValueError as mla_decode_partials does, and for page shapes the
  GPU kernel cannot load.
  """
  platform, interpret, _ = _resolve(platform, interpret, 1, num_splits)
  _positive("pages_per_block", pages_per_block)
  num_pages, page = k_rope.shape[:2]
  width = page_table.shape[1]
  pages_per_block = min(pages_per_block, width if platform == "tpu" else
                        1 << (width.bit_length() - 1))
  geometry = dict(pages_per_block=pages_per_block, page=page, width=width, num_pages=num_pages)
  if platform == "gpu":
    if page & (page - 1) or pages_per_block & (pages_per_block - 1):
      raise ValueError(f"page_size={page}, pages_per_block={pages_per_block} are invalid for the "
                       "GPU (Triton) decode kernel: both must be powers of 2 (it gathers "
                       "[pages_per_block, page_size, width] blocks)")
    _power_of_two("pages_per_block * page_size", page * pages_per_block, "a block")
    source = mla_decode_gpu.Paged(**geometry)
  else:
    source = mla_decode_tpu.Paged(**geometry)
  return _partials(q_lat, q_rope, c_kv, k_rope, kv_lengths, positions, page_table, scale=scale,
                   dequantize=dequantize, source=source, splits=num_splits, platform=platform,
                   interpret=interpret)


def _resolve(platform, interpret, block_size, num_splits) -> tuple[str, Any, int]:
  """(platform, interpret, block size) with the defaults filled in and checked."""
  on = target_platform()
  if platform is None:
    platform = on if on in PLATFORMS else "tpu"
  _check_platform(platform)
  if interpret is None:
    interpret = on not in PLATFORMS
  if block_size is None:
    block_size = default_block_size(platform)
  _positive("block_size", block_size)
  _positive("num_splits", num_splits)
  return platform, interpret, block_size


def _latent(c_kv: Any, dequantize) -> tuple[jax.Array, Optional[jax.Array]]:
  """(stored latent, per-token scale or None) from the operand latent_operand made."""
  if isinstance(c_kv, Mapping):
    if dequantize is not dequantize_block:
      raise ValueError("the Pallas decode kernel decodes a quantized latent with the cache "
                       "codec itself: pass dequantize=mla_jax.cache.dequantize_block (what "
                       "latent_operand returns); another decoder needs the XLA path "
                       "(model.decode_kernel=xla)")
    return c_kv["values"], c_kv["scale"]
  if dequantize is not None:
    raise ValueError("dequantize was given for a float latent array: the Pallas decode kernel "
                     "reads float32/bfloat16 latents as they are; pass dequantize=None")
  return value_view(c_kv), None


def _partials(q_lat, q_rope, c_kv, k_rope, kv_lengths, positions, page_table, *, scale,
              dequantize, source, splits, platform, interpret) -> Partials:
  b, t, h, c = q_lat.shape
  latent, token_scale = _latent(c_kv, dequantize)
  planes = latent_planes(latent.dtype) if token_scale is not None else 1
  compute = compute_dtype(value_dtype(latent.dtype), q_lat.dtype)
  q = t * h
  if platform == "gpu":
    block_q = min(GPU_MAX_BLOCK_Q, max(16, 1 << (q - 1).bit_length()))
    for name, width in (("kv_lora_rank / planes", c // planes),
                        ("qk_rope_head_dim", q_rope.shape[-1])):
      _power_of_two(name, width, "the latent (per plane) and the RoPE key width")
  else:
    tile = mla_decode_tpu.ROW_TILE
    block_q = min(mla_decode_tpu.MAX_ROWS, -(-q // tile) * tile)
  rows = -(-q // block_q) * block_q
  queries = _queries(q_lat, q_rope, positions, scale, planes, compute, rows)
  rope = value_view(k_rope)
  lengths = kv_lengths.astype(jnp.int32)
  table = None if page_table is None else page_table.astype(jnp.int32)
  if platform == "tpu":
    m, l, acc = mla_decode_tpu.tpu_partials(queries, latent, token_scale, rope, lengths, table,
                                            source=source, splits=splits, compute=compute,
                                            interpret=interpret, block_q=block_q)
  else:
    m, l, acc = mla_decode_gpu.gpu_partials(queries, latent, token_scale, rope, lengths, table,
                                            source=source, splits=splits, compute=compute,
                                            interpret=interpret, block_q=block_q)
  m, l, acc = merge_splits(m[..., 0], l[..., 0], interleave(acc), axis=1)  # [B,rows(,C)]
  return (m[:, :q].reshape(b, t, h), l[:, :q].reshape(b, t, h),
          acc[:, :q].reshape(b, t, h, c))


def _queries(q_lat, q_rope, positions, scale: float, planes: int, compute, rows: int) -> Queries:
  """The kernel's query rows, batched: row t*H + h of sequence b is token t's head h, scaled by
  the softmax scale once (in float32), padded to `rows` with rows that see no slot; the latent
  part split into planes (plane p holds elements p, p+planes, ...)."""
  b, t, h, c = q_lat.shape
  pad = ((0, 0), (0, rows - t * h), (0, 0))
  q = jnp.pad((q_lat.astype(jnp.float32) * scale).reshape(b, t * h, c), pad)  # [B,rows,C]
  q_r = jnp.pad((q_rope.astype(jnp.float32) * scale).reshape(b, t * h, -1), pad)  # [B,rows,R]
  seen = jnp.repeat(positions.astype(jnp.int32), h, axis=1)  # [B,T*H]
  seen = jnp.pad(seen, ((0, 0), (0, rows - t * h)), constant_values=-1)[..., None]  # [B,rows,1]
  return Queries(lat=tuple(q[..., p::planes].astype(compute) for p in range(planes)),
                 rope=q_r.astype(compute), positions=seen)
