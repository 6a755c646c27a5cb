"""How much memory a device may use, asked before anything large is allocated: an accelerator's
bytes_limit (jax's memory_stats), or for CPU devices the host's available memory shared among
them. Used by the train step's memory pre-check, the serving engine's page pool and the bench."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


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
    return host // len(devices), (f"the host's available memory ({gib(host)}) shared by "
                                  f"{len(devices)} CPU device(s)")
  limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
  if not all(limits):
    return None
  return min(limits), f"{devices[0].device_kind} memory"


def gib(num_bytes: float) -> str:
  """Bytes in GiB, or MiB below one GiB, or KiB below one MiB."""
  if num_bytes >= 2**30:
    return f"{num_bytes / 2**30:,.2f} GiB"
  if num_bytes >= 2**20:
    return f"{num_bytes / 2**20:,.1f} MiB"
  return f"{num_bytes / 2**10:,.1f} KiB"
