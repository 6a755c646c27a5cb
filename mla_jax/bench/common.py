"""What every benchmark suite shares: timing discipline, the machine header, the machine's own
ceilings (copy and read bandwidth, matmul FLOP/s), the decode suites' models, variants and
filled caches, and writing a table as Markdown, JSON rows and a plot.

Timing: the first call of a compiled function is run apart and reported as "first call" (it
includes compilation); then `repeats` calls, each ended by `jax.block_until_ready`, give the
median, min and max. Ratios in a table come from timings taken in the same run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax.cache import Cache, KVCache, LatentCache, encode_latent, store_float
from mla_jax.config.loader import load_config
from mla_jax.config.model import ModelConfig
from mla_jax.kinds import init_cache


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds per call: the first (compile included) apart, then median/min/max of `repeats`."""

  first_call_s: float
  median_s: float
  min_s: float
  max_s: float
  repeats: int

  @property
  def compile_s(self) -> float:
    """First call minus a steady call: the compilation (and first-run) overhead."""
    return max(self.first_call_s - self.median_s, 0.0)


def time_calls(call: Callable[[], Any], repeats: int, warmup: int = 1) -> Timing:
  """Times `call()` (which returns arrays; each result is block_until_ready'd).

  The first call is timed alone (compilation included); `warmup - 1` more calls run untimed;
  then `repeats` timed calls. Raises ValueError for repeats < 1 or warmup < 1.
  """
  if repeats < 1 or warmup < 1:
    raise ValueError(f"repeats={repeats} and warmup={warmup} must both be >= 1")
  start = time.perf_counter()
  jax.block_until_ready(call())
  first = time.perf_counter() - start
  for _ in range(warmup - 1):
    jax.block_until_ready(call())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return Timing(first, statistics.median(times), min(times), max(times), repeats)


def time_interleaved(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, Timing]:
  """Times several calls against each other: one round of every call in turn (the first calls,
  compilation included), then `repeats` rounds, so a change in the machine's load hits them
  alike. Each result is block_until_ready'd. Raises ValueError for repeats < 1."""
  if repeats < 1:
    raise ValueError(f"repeats={repeats} must be >= 1")

  def seconds(call) -> float:
    start = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - start

  first = {name: seconds(call) for name, call in calls.items()}
  times: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      times[name].append(seconds(call))
  return {name: Timing(first[name], statistics.median(t), min(t), max(t), repeats)
          for name, t in times.items()}


# ---- progress ------------------------------------------------------------------------------

class Progress:
  """Progress lines on stderr while a suite runs, each with the seconds since the suite began:
  `mla-jax bench decode [12.3 s]: MLA flash, context 1,024`. stdout keeps the table alone."""

  def __init__(self, suite: Optional[str] = None):
    self.restart(suite)

  def restart(self, suite: Optional[str]) -> None:
    """Starts the clock for `suite` (bench.run calls this before each suite; None: unnamed, as
    when a test calls a suite's functions directly)."""
    self.suite, self.start = suite, time.perf_counter()

  def __call__(self, message: str) -> None:
    elapsed = time.perf_counter() - self.start
    name = "mla-jax bench" if self.suite is None else f"mla-jax bench {self.suite}"
    print(f"{name} [{elapsed:.1f} s]: {message}", file=sys.stderr, flush=True)


progress = Progress()  # the one every suite reports to


# ---- the machine ---------------------------------------------------------------------------

def cpu_name() -> str:
  """The CPU model from /proc/cpuinfo (Linux) or platform."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_description() -> str:
  """Cores, CPU model, system and architecture, e.g. '8-core <CPU model>, Linux x86_64'."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return f"{cores}-core {cpu_name()}, {platform.system()} {platform.machine()}"


def header_lines(dtype: str, command: str) -> list[str]:
  """The lines every table starts with: machine, device kind, JAX version, dtype, command."""
  device = jax.devices()[0]
  return [f"machine: {machine_description()}",
          f"device: {jax.device_count()} x {device.device_kind} ({device.platform})",
          f"jax {jax.__version__}, dtype {dtype}",
          f"command: `{command}`"]


def default_dtype() -> str:
  """float32 on CPU (XLA's CPU runtime widens bfloat16 matmuls), bfloat16 on accelerators."""
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


@dataclasses.dataclass(frozen=True)
class Ceilings:
  """The machine's measured ceilings: the roofline every speed is judged against."""

  copy_bytes_per_s: float  # (read + write) bytes of a large on-device copy, per second
  matmul_flops_per_s: float  # 2 n^3 / time of an n x n matmul in the benchmark's dtype
  copy_mib: float
  matmul_n: int
  dtype: str
  read_bytes_per_s: float = 0.0  # bytes of a large array summed, per second

  @property
  def bandwidth(self) -> float:
    """The memory ceiling: the faster of copy (read + write) and read-only streaming, since a
    decode step mostly reads."""
    return max(self.copy_bytes_per_s, self.read_bytes_per_s)

  def roofline_s(self, num_bytes: float, flops: float) -> tuple[float, str]:
    """max(bytes / bandwidth, FLOPs / FLOP/s) and which ceiling binds ('memory' or 'compute')."""
    memory, compute = num_bytes / self.bandwidth, flops / self.matmul_flops_per_s
    return (memory, "memory") if memory >= compute else (compute, "compute")

  @property
  def ridge_flops_per_byte(self) -> float:
    """Arithmetic intensity where the two ceilings meet."""
    return self.matmul_flops_per_s / self.bandwidth

  def lines(self) -> list[str]:
    return [f"measured bandwidth: {self.bandwidth / 1e9:,.2f} GB/s, the faster of a copy "
            f"({self.copy_bytes_per_s / 1e9:,.2f} GB/s, read + write of a {self.copy_mib:,.0f} "
            f"MiB array) and a read-only sum of it ({self.read_bytes_per_s / 1e9:,.2f} GB/s)",
            f"measured matmul: {self.matmul_flops_per_s / 1e9:,.1f} GFLOP/s ({self.dtype}, "
            f"{self.matmul_n} x {self.matmul_n}); ridge point "
            f"{self.ridge_flops_per_byte:,.1f} FLOPs/byte"]


def measure_ceilings(dtype: str, copy_mib: float = 256, matmul_n: int = 2048,
                     repeats: int = 5) -> Ceilings:
  """Times a large on-device copy (x + 1 with x donated: one read and one write of every byte;
  not x * 1, which XLA simplifies away), a sum of the same array (one read), and an n x n
  matmul; medians of `repeats`."""
  n = int(copy_mib * 2**20 // 4)
  x = jnp.zeros((n,), jnp.float32)
  copy = jax.jit(lambda a: a + jnp.float32(1.0), donate_argnums=0)
  state = {"x": x}

  def copy_once():
    state["x"] = copy(state["x"])
    return state["x"]

  copy_time = time_calls(copy_once, repeats).median_s
  total = jax.jit(jnp.sum)
  read_time = time_calls(lambda: total(state["x"]), repeats).median_s
  a = jnp.ones((matmul_n, matmul_n), jnp.dtype(dtype))
  matmul = jax.jit(lambda p, q: p @ q)
  matmul_time = time_calls(lambda: matmul(a, a), repeats).median_s
  return Ceilings(copy_bytes_per_s=2 * x.nbytes / copy_time,
                  read_bytes_per_s=x.nbytes / read_time,
                  matmul_flops_per_s=2 * matmul_n**3 / matmul_time, copy_mib=copy_mib,
                  matmul_n=matmul_n, dtype=dtype)


def quick_ceilings(dtype: str) -> Ceilings:
  """measure_ceilings for --quick runs: a 64 MiB copy and a 512 x 512 matmul, still past the
  CPU's caches and its per-call overhead (an 8 MiB copy stays in the L3 cache and overstates
  the bandwidth; a 128 x 128 matmul is mostly call overhead and understates the FLOP/s, so a
  step could run 'faster than its roofline'), and a fraction of a second to measure."""
  return measure_ceilings(dtype, copy_mib=64, matmul_n=512, repeats=3)


# ---- models of equal size ------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def count_params(config: ModelConfig) -> int:
  """Parameters of a Transformer from shapes alone (jax.eval_shape: nothing allocated)."""
  from mla_jax.model import parameter_shapes

  shapes = parameter_shapes(config)
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


def match_parameters(reference: ModelConfig, variant: ModelConfig) -> ModelConfig:
  """`variant` with its dense MLP width (intermediate_size) changed so that its parameter count
  is as close as possible to `reference`'s: attention kinds compared at equal parameters.

  Each unit of intermediate_size is 3 * hidden_size * num_layers parameters (SwiGLU's gate, up
  and down). Raises ValueError for a MoE model or when no positive width matches.
  """
  if variant.n_routed_experts is not None:
    raise ValueError("match_parameters adjusts the dense MLP width; got a DeepSeekMoE model")
  per_unit = 3 * variant.hidden_size * variant.num_layers
  gap = count_params(reference) - count_params(variant)
  width = variant.intermediate_size + round(gap / per_unit)
  if width <= 0:
    raise ValueError(f"cannot match {count_params(reference):,} parameters with attention="
                     f"{variant.attention}: its attention alone has more")
  return dataclasses.replace(variant, intermediate_size=width)


# ---- models and caches of the decode suites (decode, throughput, compute) ------------------

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUICK_VARIANT_KV_HEADS = 2  # the quick model has 4 heads: GQA-8 becomes GQA-2


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row kind of a decode or throughput suite: model-config overrides and the attention
  path.

  attn_impl None = the path generate uses. alternatives: other paths to measure at the longest
  context; the fastest of them and attn_impl is kept (a baseline's best code path).
  """

  name: str
  overrides: tuple[tuple[str, Any], ...] = ()
  attn_impl: Optional[str] = None
  alternatives: tuple[str, ...] = ()


def base_config(args: argparse.Namespace, max_len: int) -> ModelConfig:
  """DeepSeek-V2-Lite's attention shapes (quick: a tiny model), dense MLP, byte vocabulary."""
  if args.quick:
    return ModelConfig(hidden_size=64, num_layers=args.layers, num_heads=4, q_lora_rank=None,
                       kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                       intermediate_size=64, max_seq_len=max_len, dtype=args.dtype,
                       param_dtype=args.dtype)
  lite = load_config(CONFIGS / "deepseek_v2_lite.yaml").model
  return dataclasses.replace(lite, vocab_size=260, num_layers=args.layers, n_routed_experts=None,
                             intermediate_size=1408, max_seq_len=max_len, dtype=args.dtype,
                             param_dtype=args.dtype)


def variant_config(base: ModelConfig, variant: Variant) -> tuple[str, ModelConfig]:
  """The variant's label and config; a variant that sets num_kv_heads (GQA) is labelled with
  the KV heads it really has (a model with too few heads for the variant's count gets
  QUICK_VARIANT_KV_HEADS)."""
  overrides = dict(variant.overrides)
  kv_heads = overrides.get("num_kv_heads")
  if kv_heads is not None and base.num_heads <= kv_heads:
    overrides["num_kv_heads"] = QUICK_VARIANT_KV_HEADS
  config = dataclasses.replace(base, **overrides)
  name = variant.name if kv_heads is None else f"GQA-{config.kv_heads}"
  return name, config


def filled_cache(config: ModelConfig, batch: int, max_len: int, length: int, seed: int) -> Cache:
  """A cache of max_len slots, every slot random and the first `length` counted as held: random
  float32 entries put in the cache's own storage by the library's encoders (bfloat16 bits, or a
  quantized latent with its scales), with no zeroed copy first."""
  empty = jax.eval_shape(lambda: init_cache(config, batch, max_len))
  keys = iter(jax.random.split(jax.random.key(seed), 2 * config.num_layers))

  def normal(shape) -> jax.Array:
    return jax.random.normal(next(keys), shape, jnp.float32)

  layers = []
  for like in empty.layers:
    if isinstance(like, LatentCache):
      new = encode_latent(LatentCache(c_kv=normal((batch, max_len, config.kv_lora_rank)),
                                      k_rope=normal(like.k_rope.shape)), like)  # [B,S,C], [B,S,R]
      layers.append(LatentCache(c_kv=store_float(new.c_kv, like.c_kv.dtype),
                                k_rope=store_float(new.k_rope, like.k_rope.dtype),
                                c_kv_scale=new.c_kv_scale))
    else:
      layers.append(KVCache(k=store_float(normal(like.k.shape), like.k.dtype),  # [B,G,S,K]
                            v=store_float(normal(like.v.shape), like.v.dtype)))  # [B,G,S,V]
  return Cache(layers=tuple(layers), lengths=jnp.full((batch,), length, jnp.int32))


def nbytes(tree) -> int:
  """Bytes of every array (or shape) in a pytree."""
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def cost(compiled) -> dict:
  """XLA's cost analysis of a compiled program as one dict (some versions return a list)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return dict(analysis or {})


def display_path(path: Path) -> str:
  """`path` relative to the working directory when it lies below it (so a printed command is
  the same on every checkout: 'configs/tiny.yaml'), else absolute."""
  try:
    return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
  except ValueError:
    return str(path)


# ---- inputs --------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, option: str) -> int:
  """'4GiB', '512MiB', '1e9'... -> bytes; ValueError naming `option` otherwise."""
  match = _SIZE.match(str(text))
  if not match:
    raise ValueError(f"{option} {text!r} is invalid: expected a size such as 4GiB or 512MiB")
  value = float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()]
  if value < 1:
    raise ValueError(f"{option} {text!r} is invalid: must be at least 1 byte")
  return int(value)


def parse_ints(text: str, option: str, minimum: int = 1) -> list[int]:
  """'1024,2048' -> [1024, 2048]; ValueError naming `option` for anything else."""
  try:
    values = [int(part) for part in str(text).split(",") if part.strip()]
  except ValueError:
    raise ValueError(f"{option} {text!r} is invalid: expected comma-separated integers") from None
  if not values or min(values) < minimum:
    raise ValueError(f"{option} {text!r} is invalid: expected integers >= {minimum}")
  return values


# ---- tables --------------------------------------------------------------------------------

def fmt(value: Any, digits: int = 3) -> str:
  """Numbers with thousands separators ('34,560'); floats to `digits` significant places."""
  if value is None:
    return "-"
  if isinstance(value, (bool, str)):
    return str(value)
  if isinstance(value, (int, np.integer)):
    return f"{int(value):,}"
  value = float(value)
  if not math.isfinite(value):
    return str(value)
  if value == 0:
    return "0"
  magnitude = math.floor(math.log10(abs(value)))
  decimals = max(digits - 1 - magnitude, 0)
  return f"{value:,.{decimals}f}"


@dataclasses.dataclass
class Table:
  """Rows of one suite: `columns` are (key in each row, header) pairs."""

  title: str
  columns: Sequence[tuple[str, str]]
  rows: list[dict[str, Any]]
  notes: list[str] = dataclasses.field(default_factory=list)
  formats: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> "{:.4f}" etc.

  def cell(self, row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if isinstance(value, str):
      return value
    if key in self.formats and value is not None:
      return self.formats[key].format(value)
    return fmt(value)

  def markdown(self) -> str:
    lines = [f"### {self.title}", "",
             "| " + " | ".join(h for _, h in self.columns) + " |",
             "|" + "|".join(" --- " for _ in self.columns) + "|"]
    for row in self.rows:
      lines.append("| " + " | ".join(self.cell(row, k) for k, _ in self.columns) + " |")
    lines += [""] + [f"{note}" for note in self.notes]
    return "\n".join(lines).rstrip() + "\n"


@dataclasses.dataclass
class Report:
  """What a suite returns: header lines, its tables and a function that draws its plot."""

  suite: str
  header: list[str]
  tables: list[Table]
  plot: Optional[Callable[[Path], None]] = None  # draws into the given PNG path

  def markdown(self) -> str:
    head = "\n".join(f"- {line}" for line in self.header)
    return f"## mla-jax bench {self.suite}\n\n{head}\n\n" + "\n".join(t.markdown() for t in
                                                                      self.tables)

  def write(self, out_dir: Path) -> list[Path]:
    """Writes SUITE.md, SUITE.json (header and every table's raw rows) and SUITE.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{self.suite}.md"
    md.write_text(self.markdown())
    raw = out_dir / f"{self.suite}.json"
    raw.write_text(json.dumps({"suite": self.suite, "header": self.header,
                               "tables": [{"title": t.title, "rows": t.rows, "notes": t.notes}
                                          for t in self.tables]}, indent=1, default=_json))
    written = [md, raw]
    if self.plot is not None:
      import matplotlib

      matplotlib.use("Agg")
      png = out_dir / f"{self.suite}.png"
      self.plot(png)
      written.append(png)
    return written


def _json(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def select_variants(names: Sequence[str], text: Optional[str], option: str = "--variants"
                    ) -> list[str]:
  """The subset of `names` a comma-separated `text` asks for, in `names`' order (None: all).
  Matching ignores case; an unknown name is a ValueError listing the allowed ones."""
  if text is None:
    return list(names)
  wanted = [part.strip().lower() for part in text.split(",") if part.strip()]
  known = {name.lower(): name for name in names}
  unknown = [w for w in wanted if w not in known]
  if unknown or not wanted:
    raise ValueError(f"{option} {text!r} is invalid: choose from {', '.join(names)}")
  return [name for name in names if name.lower() in wanted]
