"""The memory pre-check: what one device may use, what the compiled train step needs (XLA's
memory analysis), the attention's share of it, and a refusal naming the knobs when it does not
fit, before any array is allocated."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax

from mla_jax.config.model import ModelConfig
from mla_jax.config.run import Config
from mla_jax.device_memory import device_memory_available, gib as _gib
from mla_jax.layers.flash_attention import unrolled_visits
from mla_jax.layers.flash_blocks import balanced_block
from mla_jax.layers.masking import resolve_attn_impl


def step_memory(compiled: Any) -> Optional[dict[str, int]]:
  """Per-device bytes of a compiled step from XLA's memory analysis: arguments, outputs not
  aliased to donated arguments, temporaries, code; and their sum, the peak to budget for."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  parts = {"arguments": analysis.argument_size_in_bytes,
           "outputs": max(analysis.output_size_in_bytes - analysis.alias_size_in_bytes, 0),
           "temporaries": analysis.temp_size_in_bytes,
           "code": analysis.generated_code_size_in_bytes}
  return {**parts, "total": sum(parts.values())}


def flash_operands(model: ModelConfig, batch: int, seq_len: int
                   ) -> tuple[Optional[jax.ShapeDtypeStruct], ...]:
  """The shapes and dtype of what a training step's attention layer passes flash_attention:
  (q, k, v, q_rope, k_rope), as layers/mla.py (per-head k_nope and values, one shared RoPE key)
  and layers/attention.py (the baselines' G key/value heads of N + R, no rope term) build them."""
  b, t, h, dtype = batch, seq_len, model.num_heads, model.dtype
  shape = lambda *dims: jax.ShapeDtypeStruct(dims, dtype)  # noqa: E731
  if model.attention == "mla":
    n, r, v = model.qk_nope_head_dim, model.qk_rope_head_dim, model.v_head_dim
    return shape(b, t, h, n), shape(b, t, h, n), shape(b, t, h, v), shape(b, t, h, r), shape(b, t, r)
  g, k = model.kv_heads, model.qk_head_dim
  return shape(b, t, h, k), shape(b, t, g, k), shape(b, t, g, model.v_head_dim), None, None


def attention_memory(config: Config, batch_shards: int = 1, head_shards: int = 1
                     ) -> tuple[str, int, str]:
  """The train step's attention path (train.attn_impl resolved at train.seq_len) and the bytes
  per device of what it keeps for the backward pass that grows faster than the activations:
  (path, bytes, description). Counted from the shapes, a lower bound on the attention's share:

  naive            each layer's softmax [B,H,T,T] float32 (T = seq_len; B and H per device),
                   kept for the backward pass (one layer at a time under train.remat);
  flash_attention  each layer's log-sum-exp [B,H,T] float32; the scores live one block of
                   [B,H,flash_block_q,flash_block_k] at a time, or, where flash attention
                   unrolls its block pairs (layers/flash_attention.unrolled_visits, at short T),
                   all pairs' blocks side by side in each layer.
  """
  m, tc = config.model, config.train
  t = tc.seq_len
  path = resolve_attn_impl(tc.attn_impl, t, has_cache=False)
  batch = -(-tc.batch_size // batch_shards)
  heads = -(-m.num_heads // head_shards)
  # MTP module k (mla_jax/mtp.py) attends over T - k tokens: the same path unless that falls
  # below where 'auto' switches.
  mtp_paths = [resolve_attn_impl(tc.attn_impl, t - k, has_cache=False)
               for k in range(1, m.num_mtp_layers + 1)]
  mtp_same = sum(p == path for p in mtp_paths)
  layers = m.num_layers + mtp_same if tc.remat == "none" else 1
  whose = "" if not m.num_mtp_layers else (
      f" ({m.num_layers} layers and {mtp_same} MTP module(s)"
      + (f"; {len(mtp_paths) - mtp_same} MTP module(s) at T - depth tokens run the other path"
         if mtp_same < len(mtp_paths) else "") + ")")
  if path == "naive":
    each = batch * heads * t * t * 4
    return path, layers * each, (f"keeps each layer's [B,H,T,T] float32 softmax for the backward "
                                 f"pass: {layers} x {_gib(each)}{whose}")
  each = batch * heads * t * 4
  bq, bk = balanced_block(t, m.flash_block_q), balanced_block(t, m.flash_block_k)
  block = batch * heads * bq * bk * 4
  # The unrolling is decided on the global shapes, as the jitted step traces them.
  visits = unrolled_visits(*flash_operands(m, tc.batch_size, t), None, None, m.flash_block_q,
                           m.flash_block_k)
  scores = (f"computes the scores one [B,H,{bq},{bk}] block at a time ({_gib(block)})"
            if visits is None or sum(visits) == 1 else
            f"computes the scores of its {sum(visits)} [B,H,{bq},{bk}] block pairs side by side, "
            f"unrolled ({sum(visits)} x {_gib(block)} per layer)")
  return path, layers * each, (f"keeps each layer's [B,H,T] log-sum-exp for the backward pass: "
                               f"{layers} x {_gib(each)}{whose}, and {scores}")


def check_memory(config: Config, compiled: Any, devices: list,
                 available: Optional[tuple[int, str]] = None, batch_shards: int = 1,
                 head_shards: int = 1) -> Optional[str]:
  """Refuses (ValueError, with the figures and the knobs that lower them) a train step whose
  compiled memory exceeds what each device has; returns the line that reports the fit.
  batch_shards / head_shards: how many ways the mesh splits the batch and the heads (for the
  attention's share, attention_memory)."""
  needed = step_memory(compiled)
  available = available or device_memory_available(devices)
  if needed is None or available is None:
    return None
  limit, what = available
  path, _, attention = attention_memory(config, batch_shards, head_shards)
  figures = (f"{_gib(needed['total'])} per device ({_gib(needed['arguments'])} parameters, "
             f"optimizer state and batch + {_gib(needed['temporaries'])} activations and other "
             f"temporaries, from XLA's memory analysis of the compiled step; of it, "
             f"{path.replace('_attention', '')} attention {attention})")
  if needed["total"] > limit:
    tc = config.train
    raise ValueError(
        f"the train step needs {figures}, more than the {_gib(limit)} per device available "
        f"({what}); lower train.batch_size (now {tc.batch_size}) or train.seq_len (now "
        f"{tc.seq_len}), "
        + ("run flash attention, whose memory grows linearly with seq_len, with "
           "train.attn_impl=flash_attention, " if path == "naive" else "")
        + "split the state over more devices with mesh.fsdp / mesh.tensor"
        + (", or recompute activations in the backward pass with train.remat=full (most "
           "effective with model.scan_layers=true)" if tc.remat == "none" else ""))
  return f"train step memory: {figures}; {_gib(limit)} available per device ({what})"


def attention_memory_lines(config: Config) -> list[str]:
  """What `mla-jax info` prints about the train step's attention: the path train.attn_impl
  takes at train.seq_len, and each path's share on one device (attention_memory)."""
  tc = config.train
  path = attention_memory(config)[0]
  lines = [f"train step attention at train.seq_len={tc.seq_len:,}, batch {tc.batch_size} on one "
           f"device: {path} (train.attn_impl={tc.attn_impl})"]
  for impl in ("naive", "flash_attention"):
    forced = dataclasses.replace(config, train=dataclasses.replace(tc, attn_impl=impl))
    _, kept, description = attention_memory(forced)
    lines.append(f"  {impl} {description}; {_gib(kept)} kept in all")
  return lines
