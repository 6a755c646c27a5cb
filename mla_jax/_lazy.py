"""Lazy re-exports (PEP 562): a package's public names are imported on first use, so importing
one concept (or the `mla-jax` command, before its signal handlers are set) imports no other."""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Iterable


def lazy_exports(package: str, names: dict[str, str], listed: Iterable[str] = ()
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
  """(__getattr__, __dir__) for `package`, whose `names` map each name to the module defining
  it; `listed` adds names that `dir()` shows besides them (e.g. __version__)."""
  namespace = sys.modules[package].__dict__
  shown = sorted(names) + list(listed)

  def __getattr__(name: str):
    if name not in names:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(names[name]), name)
    namespace[name] = value  # later lookups skip this function
    return value

  def __dir__() -> list[str]:
    return shown

  return __getattr__, __dir__
