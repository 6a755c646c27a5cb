"""Validation helpers shared by the config dataclasses: each check raises ValueError naming the
field, the value and what is allowed, before any array is created."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, Optional


def _fail(field: str, value: Any, allowed: str) -> None:
  raise ValueError(f"{field}={value!r} is invalid: {allowed}")


def _did_you_mean(name: str, candidates: list[str]) -> str:
  """' (did you mean 'a' or 'b'?)' for the close candidates (difflib), else ''."""
  close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
  return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _check_type(field: str, value: Any, annotation: Any) -> Any:
  """Checks one YAML/Python value against a field's annotation; returns it (ints widen to float,
  integral floats such as 1e3 narrow to int). Raises ValueError naming the field for a value of
  the wrong type, and for NaN or infinity where a float is due."""
  optional = typing.get_origin(annotation) is typing.Union
  if optional:
    if value is None:
      return None
    annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
  if annotation is bool:
    if not isinstance(value, bool):
      _fail(field, value, "expected true or false")
    return value
  if annotation is int:
    if isinstance(value, float) and value.is_integer():  # 1e3 and 2E4 are integers written short
      return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
      _fail(field, value, "expected an integer" + (" or null" if optional else ""))
    return value
  if annotation is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      _fail(field, value, "expected a number" + (" or null" if optional else ""))
    if not math.isfinite(value):  # .nan / .inf pass every `<` check below and poison the run
      _fail(field, value, "expected a finite number" + (" or null" if optional else ""))
    return float(value)
  if annotation is str:
    if not isinstance(value, str):
      _fail(field, value, "expected a string")
    return value
  return value  # nested sections are checked by their own dataclass


def _check_fields(obj: Any, prefix: str) -> None:
  """Type-checks every field of a frozen dataclass in place (used from __post_init__)."""
  hints = typing.get_type_hints(type(obj))
  for f in dataclasses.fields(obj):
    value = _check_type(f"{prefix}{f.name}", getattr(obj, f.name), hints[f.name])
    object.__setattr__(obj, f.name, value)


def _positive(field: str, value: Optional[float], optional: bool = False) -> None:
  if value is None and optional:
    return
  if value is None or value <= 0:
    _fail(field, value, "must be > 0" + (" or null" if optional else ""))
