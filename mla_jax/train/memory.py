"""The memory pre-check: what one device may use, what the compiled train step needs (XLA's
memory analysis), and a refusal naming the knobs when it does not fit, before any array is
allocated."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from mla_jax.config.run import Config


def host_memory_available() -> Optional[int]:
  """Bytes the host can still give (MemAvailable in /proc/meminfo; else physical pages)."""
  try:
    for line in Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError):
    return None


def device_memory_available(devices: list) -> Optional[tuple[int, str]]:
  """(bytes one device may use, what that is) for the mesh's local devices: an accelerator's
  bytes_limit, or for CPU devices the host's available memory shared among them."""
  if all(d.platform == "cpu" for d in devices):
    host = host_memory_available()
    if host is None:
      return None
    return host // len(devices), (f"the host's available memory ({_gib(host)}) shared by "
                                  f"{len(devices)} CPU device(s)")
  limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
  if not all(limits):
    return None
  return min(limits), f"{devices[0].device_kind} memory"


def _gib(num_bytes: float) -> str:
  """Bytes in GiB, or MiB below one GiB."""
  if num_bytes >= 2**30:
    return f"{num_bytes / 2**30:,.2f} GiB"
  return f"{num_bytes / 2**20:,.1f} MiB"


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


def check_memory(config: Config, compiled: Any, devices: list,
                 available: Optional[tuple[int, str]] = None) -> Optional[str]:
  """Refuses (ValueError, with the figures and the knobs that lower them) a train step whose
  compiled memory exceeds what each device has; returns the line that reports the fit."""
  needed = step_memory(compiled)
  available = available or device_memory_available(devices)
  if needed is None or available is None:
    return None
  limit, what = available
  figures = (f"{_gib(needed['total'])} per device ({_gib(needed['arguments'])} parameters, "
             f"optimizer state and batch + {_gib(needed['temporaries'])} activations and other "
             "temporaries, from XLA's memory analysis of the compiled step)")
  if needed["total"] > limit:
    tc = config.train
    raise ValueError(
        f"the train step needs {figures}, more than the {_gib(limit)} per device available "
        f"({what}); lower train.batch_size (now {tc.batch_size}) or train.seq_len (now "
        f"{tc.seq_len}), split the state over more devices with mesh.fsdp / mesh.tensor"
        + (", or recompute activations in the backward pass with train.remat=full (most "
           "effective with model.scan_layers=true)" if tc.remat == "none" else ""))
  return f"train step memory: {figures}; {_gib(limit)} available per device ({what})"
