"""DeepSeekMoE at its real cost, scan compile time and remat memory (docs/moe.md).

The measurements behind the MoE, scan and remat claims: the MoE layer's step time, training
cost against dense models of equal total and active parameters, compile time of the scanned
layer loop, memory under each remat policy, and the grouped matmul against ragged_dot.

Every function returns rows (dicts) for `mla-jax bench`; `python -m mla_jax.bench.moe [part ...]`
prints them as JSON lines. Times are wall-clock medians with min and max over `repeats` runs,
compile time measured apart and excluded; FLOPs come from XLA's cost analysis of the compiled
program (fwd+bwd counted as XLA counts it), compared with the FLOPs the active parameters imply:
2 per multiply-add, forward + backward = 3x forward (the usual 6 N per token for training).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import statistics
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mla_jax.config.model import ModelConfig
from mla_jax.layers.moe import DeepSeekMoE
from mla_jax.model import Transformer, first_scanned_layer
from mla_jax.train.step import loss_fn

Row = dict[str, Any]


def _timed(fn: Callable, args: tuple, repeats: int) -> dict[str, float]:
  """Compiles fn (jitted) on args, then times `repeats` calls: seconds."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "compile_s": compile_s, "flops": float(compiled.cost_analysis().get("flops", 0.0))}


# V2-Lite's MoE layer: 64 routed experts, top-6, 2 shared; width reduced to fit a CPU run.
V2_LITE_MOE = ModelConfig(vocab_size=1024, hidden_size=256, num_layers=1, num_heads=4,
                          q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32,
                          qk_rope_head_dim=16, v_head_dim=32, intermediate_size=1024,
                          n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
                          moe_intermediate_size=176, max_seq_len=4096)


def moe_layer_rows(tokens: int = 4096, repeats: int = 3, config: ModelConfig = V2_LITE_MOE,
                   impls: tuple[str, ...] = ("dispatch", "dense")) -> list[Row]:
  """One DeepSeekMoE layer, forward + backward (params and input) on `tokens` tokens, float32."""
  c = config
  x = jax.random.normal(jax.random.key(0), (1, tokens, c.hidden_size))
  params = DeepSeekMoE(c).init(jax.random.key(1), x)["params"]
  d, i, e, k, s = (c.hidden_size, c.moe_intermediate_size, c.n_routed_experts,
                   c.num_experts_per_tok, c.n_shared_experts)
  active = 3 * 2 * tokens * (3 * d * i * (k + s) + d * e)  # fwd+bwd of K routed + S shared + router
  rows = []
  for impl in impls:
    layer = DeepSeekMoE(dataclasses.replace(c, moe_impl=impl))
    step = jax.value_and_grad(lambda p, x, layer=layer: jnp.mean(layer.apply({"params": p}, x) ** 2),
                              argnums=(0, 1))
    result = _timed(step, (params, x), repeats)
    rows.append({"suite": "train", "row": "moe_layer", "impl": impl, "tokens": tokens,
                 "hidden_size": d, "moe_intermediate_size": i, "n_routed_experts": e,
                 "num_experts_per_tok": k, "n_shared_experts": s, **result,
                 "active_flops": active, "flops_over_active": result["flops"] / active,
                 "tokens_per_s": tokens / result["median_s"]})
  if len(rows) == 2:
    rows[0]["speedup_vs_dense"] = rows[1]["median_s"] / rows[0]["median_s"]
  return rows


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _param_count(cfg: ModelConfig) -> int:
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return _count(shapes["params"])


def active_param_count(cfg: ModelConfig) -> int:
  """Parameters a token goes through: all but the (E - K) unchosen experts of each MoE layer."""
  total = _param_count(cfg)
  if cfg.n_routed_experts is None:
    return total
  moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
  unused = cfg.n_routed_experts - cfg.num_experts_per_tok
  return total - moe_layers * unused * 3 * cfg.hidden_size * cfg.moe_intermediate_size


def dense_matching(base: ModelConfig, target: int, **changes) -> ModelConfig:
  """A dense model like `base` (with `changes`) whose intermediate_size brings its parameter
  count closest to `target` (parameters are linear in it)."""
  dense = dataclasses.replace(base, n_routed_experts=None, **changes)
  low = _param_count(dataclasses.replace(dense, intermediate_size=8))
  high = _param_count(dataclasses.replace(dense, intermediate_size=16))
  per_unit = (high - low) / 8
  size = max(8, int(round((8 + (target - low) / per_unit) / 8)) * 8)
  return dataclasses.replace(dense, intermediate_size=size)


# A small MLA + DeepSeekMoE model (V2's recipe: first layer dense, 2 shared + top-6 of 64).
SMALL_MOE = ModelConfig(vocab_size=260, hidden_size=128, num_layers=4, num_heads=4,
                        q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                        v_head_dim=32, intermediate_size=512, max_seq_len=256,
                        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
                        moe_intermediate_size=64, first_k_dense_replace=1)


def training_cost_rows(batch: int = 8, seq_len: int = 256, repeats: int = 3,
                       moe: ModelConfig = SMALL_MOE) -> list[Row]:
  """Training steps (AdamW, float32) of the MoE model, a dense MHA model of the same total
  parameters and a dense MHA model of its active parameters: tokens/s and FLOPs per token."""
  total, active = _param_count(moe), active_param_count(moe)
  models = {"mla_deepseekmoe": moe,
            "mha_dense_same_total": dense_matching(moe, total, attention="mha"),
            "mha_dense_same_active": dense_matching(moe, active, attention="mha")}
  tokens = jax.random.randint(jax.random.key(0), (batch, seq_len + 1), 0, moe.vocab_size)
  rows = []
  for name, cfg in models.items():
    model = Transformer(cfg)
    params = model.init(jax.random.key(1), tokens[:, :8])["params"]
    optimizer = optax.adamw(1e-3)

    def step(params, opt_state, tokens, model=model, optimizer=optimizer):
      loss, grads = jax.value_and_grad(
          lambda p: loss_fn(model, p, tokens[:, :-1], tokens[:, 1:]))(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    result = _timed(step, (params, optimizer.init(params), tokens), repeats)
    n = batch * seq_len
    rows.append({"suite": "train", "row": "training_cost", "model": name,
                 "attention": cfg.attention, "params": _param_count(cfg),
                 "active_params": active_param_count(cfg), "tokens_per_step": n, **result,
                 "tokens_per_s": n / result["median_s"], "flops_per_token": result["flops"] / n})
  moe_row = rows[0]
  for row in rows[1:]:
    row["moe_cost_saving_flops"] = 1 - moe_row["flops_per_token"] / row["flops_per_token"]
    row["moe_cost_saving_time"] = 1 - row["tokens_per_s"] / moe_row["tokens_per_s"]
  return rows


# DeepSeek-V2-Lite's layout (27 layers, the first dense, 64 experts top-6 + 2 shared, no query
# compression) at reduced width.
V2_LITE_LAYOUT = ModelConfig(vocab_size=1024, hidden_size=128, num_layers=27, num_heads=4,
                             q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32,
                             qk_rope_head_dim=16, v_head_dim=32, intermediate_size=512,
                             n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
                             moe_intermediate_size=32, first_k_dense_replace=1, max_seq_len=256)


def llvm_kernels(lowered: jax.stages.Lowered) -> collections.Counter:
  """The LLVM modules XLA's CPU backend generates for a lowered program, one per distinct
  fusion kernel (identical ones are compiled once), counted by kind from a dump of a second
  compile (`xla_dump_to`): the fusion's name without its number, which XLA builds from the
  fused ops (e.g. `bitcast_dynamic-update-slice_fusion`, `wrapped_broadcast`). XLA:CPU's compile
  time grows with their number. Empty when the backend dumps no LLVM IR (not XLA:CPU)."""
  kinds: collections.Counter = collections.Counter()
  with tempfile.TemporaryDirectory() as directory:
    lowered.compile(compiler_options={"xla_dump_to": directory})
    for name in os.listdir(directory):
      if name.endswith(".ir-no-opt.ll"):  # module_0008.jit_f.<kernel>[.N][_kernel_module].ir-..
        kernel = name.split(".", 2)[2][:-len(".ir-no-opt.ll")]
        kernel = kernel.replace("_kernel_module", "").replace("__compute_module_", "")
        kinds[re.sub(r"(\.\d+)+$", "", kernel)] += 1
  return kinds


def _compile_row(cfg: ModelConfig, batch: int, seq_len: int, grad: bool, remat: str) -> Row:
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  model = Transformer(cfg, remat=remat)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  loss = lambda p, x, model=model: loss_fn(model, p, x, x)  # noqa: E731
  fn = jax.jit(jax.value_and_grad(loss) if grad else loss)
  start = time.perf_counter()
  lowered = fn.lower(params, tokens)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start - lower_s
  kinds = llvm_kernels(lowered)
  return {"suite": "train", "row": "scan_compile", "scan_layers": cfg.scan_layers,
          "num_layers": cfg.num_layers, "grad": grad, "remat": remat, "lower_s": lower_s,
          "compile_s": compile_s, "total_s": lower_s + compile_s,
          "hlo_chars": len(compiled.as_text()), "llvm_kernels": sum(kinds.values()) or None,
          "llvm_kernel_kinds": dict(kinds.most_common())}


def scan_compile_rows(config: ModelConfig = V2_LITE_LAYOUT, batch: int = 2, seq_len: int = 64,
                      grad: bool = True, remat: str = "none") -> list[Row]:
  """Seconds to lower and compile a training gradient (loss and grads; the loss alone with
  grad=False), unrolled vs scanned, and the LLVM kernels XLA:CPU generates for each.

  A third row, `floor`, compiles the unrolled model cut to the layers a scanned program holds
  anyway: the dense first_k_dense_replace layers plus one repeated block. However the scan is
  built, its program contains that much, so floor / unrolled bounds scanned / unrolled below.
  """
  floor_layers = first_scanned_layer(config) + 1
  rows = [_compile_row(dataclasses.replace(config, scan_layers=scan), batch, seq_len, grad, remat)
          for scan in (False, True)]
  rows[1]["scan_over_unrolled"] = rows[1]["total_s"] / rows[0]["total_s"]
  if floor_layers < config.num_layers:
    floor = _compile_row(dataclasses.replace(config, scan_layers=False, num_layers=floor_layers),
                         batch, seq_len, grad, remat)
    floor["floor"] = True
    floor["floor_over_unrolled"] = floor["total_s"] / rows[0]["total_s"]
    rows.append(floor)
  return rows


def remat_rows(num_layers: int = 6, batch: int = 8, seq_len: int = 256) -> list[Row]:
  """Compiled peak temporary memory (bytes) of a training gradient per train.remat policy, with
  layers unrolled and scanned: a narrow model on long sequences, where activations dominate."""
  base = ModelConfig(hidden_size=32, num_layers=num_layers, num_heads=2, q_lora_rank=16,
                     kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                     intermediate_size=64, max_seq_len=seq_len)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  rows = []
  for scan in (False, True):
    cfg = dataclasses.replace(base, scan_layers=scan)
    params = jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                            jnp.zeros((1, 8), jnp.int32))["params"]
    for remat in ("none", "dots_saveable", "full"):
      model = Transformer(cfg, remat=remat)
      grad = jax.jit(jax.value_and_grad(lambda p, x, model=model: loss_fn(model, p, x, x)))
      memory = grad.lower(params, tokens).compile().memory_analysis()
      rows.append({"suite": "train", "row": "remat_memory", "scan_layers": scan,
                   "remat": remat, "num_layers": num_layers, "tokens": batch * seq_len,
                   "temp_bytes": int(memory.temp_size_in_bytes)})
  return rows


def ragged_dot_rows(tokens: int = 4096, config: ModelConfig = V2_LITE_MOE) -> list[Row]:
  """FLOPs XLA compiles for one grouped projection (the routed pairs sorted by expert, [M,D] x
  [E,D,I]) through jax.lax.ragged_dot and through this library's block-padded grouped matmul,
  against the 2 M D I the product needs. Compile only: no timing."""
  from mla_jax.layers.moe import default_block_size, grouped_matmul, plan_dispatch

  c = config
  e, d, i = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size
  m = tokens * c.num_experts_per_tok
  lhs = jax.ShapeDtypeStruct((m, d), jnp.float32)
  rhs = jax.ShapeDtypeStruct((e, d, i), jnp.float32)
  experts = jax.ShapeDtypeStruct((m,), jnp.int32)
  b = default_block_size(m, e)

  def blocks(lhs, rhs, experts):
    plan = plan_dispatch(experts, e, b)
    rows = jnp.zeros((plan.num_rows, d), lhs.dtype).at[plan.rows].set(lhs)
    return grouped_matmul(rows, rhs, plan.block_expert)

  def ragged(lhs, rhs, experts):
    return jax.lax.ragged_dot(lhs, rhs, jnp.bincount(experts, length=e))

  needed = 2 * m * d * i
  out = []
  for name, fn in (("jax.lax.ragged_dot", ragged), (f"block-padded b={b}", blocks)):
    flops = jax.jit(fn).lower(lhs, rhs, experts).compile().cost_analysis().get("flops", 0.0)
    out.append({"suite": "train", "row": "grouped_matmul_flops", "impl": name, "pairs": m,
                "backend": jax.default_backend(), "flops": float(flops), "needed_flops": needed,
                "flops_over_needed": float(flops) / needed})
  return out


PARTS = {"ragged_dot": ragged_dot_rows, "moe_layer": moe_layer_rows, "training_cost": training_cost_rows,
         "scan_compile": scan_compile_rows, "remat": remat_rows}


def rows(parts: tuple[str, ...] = tuple(PARTS)) -> list[Row]:
  """All rows of the named parts (ragged_dot, moe_layer, training_cost, scan_compile, remat)."""
  unknown = [p for p in parts if p not in PARTS]
  if unknown:
    raise ValueError(f"unknown MoE benchmark part(s) {unknown}: allowed {', '.join(PARTS)}")
  return [row for part in parts for row in PARTS[part]()]


if __name__ == "__main__":
  for row in rows(tuple(sys.argv[1:]) or tuple(PARTS)):
    print(json.dumps(row), flush=True)
