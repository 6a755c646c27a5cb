"""Config files: YAML with YAML 1.2's numbers, dotted key=value overrides, the presets shipped
with the package, and load_config / load_config_args, which turn them into a Config."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from mla_jax.config.fields import _did_you_mean
from mla_jax.config.run import _SECTIONS, Config

# mla_jax/configs (a link to the repository's configs/, whose files a wheel copies in); a
# source tree without the link reads the repository's configs/ directly.
PRESETS_DIR = Path(__file__).resolve().parents[1] / "configs"
if not PRESETS_DIR.is_dir():
  PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs"


class _Loader(yaml.SafeLoader):
  """YAML with YAML 1.2's numbers: `1e-3`, `3E-4` and `.5` are floats, as a user means them
  (PyYAML's YAML 1.1 resolver reads an exponent without a dot as a string). A key given twice in
  one mapping is a ConstructorError at its second line (PyYAML alone keeps the last silently)."""

  def construct_mapping(self, node, deep=False):
    if isinstance(node, yaml.MappingNode):
      self._check_unique_keys(node)
    return super().construct_mapping(node, deep=deep)

  def _check_unique_keys(self, node: yaml.MappingNode) -> None:
    """The keys written in this mapping are distinct (a `<<: *anchor` merge may be overridden)."""
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
      if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
        continue
      key = self.construct_object(key_node)
      if key in seen:
        raise yaml.constructor.ConstructorError(
            None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1}; keep one)",
            key_node.start_mark)
      seen[key] = key_node.start_mark


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
  """YAML text -> Python values, numbers in every common notation (1e-3, 3E-4, 0.001, 1_000)."""
  return yaml.load(text, Loader=_Loader)


_SCALARS = ("workdir", "seed")  # top-level keys that are values, not sections
_MAPPING_FIELDS = {("model", "rope_scaling")}  # free-form mappings, checked by their own class
_KNOWN = sorted(list(_SECTIONS) + list(_SCALARS))
DEFAULT_NAME = "tiny"  # the built-in defaults are configs/tiny.yaml


def config_keys() -> list[str]:
  """Every dotted key an override may set, e.g. 'model.kv_lora_rank', 'seed'."""
  return list(_SCALARS) + [f"{section}.{f.name}" for section, cls in _SECTIONS.items()
                           for f in dataclasses.fields(cls)]


def _unknown_key(key: str, detail: str = "") -> ValueError:
  return ValueError(f"unknown config key {key!r}{detail}{_did_you_mean(key, config_keys())}")


def _parse_override(text: str) -> tuple[list[str], Any]:
  if "=" not in text:
    raise ValueError(f"override {text!r} is invalid: expected key=value, e.g. model.kv_lora_rank=64")
  key, raw = text.split("=", 1)
  path = key.strip().split(".")
  if not all(path):
    raise ValueError(f"override {text!r} is invalid: empty key part in {key!r}")
  try:
    return path, parse_yaml(raw) if raw.strip() else ""
  except yaml.YAMLError as err:
    raise ValueError(f"override {text!r} is invalid: its value is not YAML "
                     f"({_yaml_problem(err)}); write a number, true, false, null, [a, b] or a "
                     "quoted string") from None


def _apply_override(raw: dict[str, Any], path: list[str], value: Any) -> None:
  """Sets raw[a][b]... = value, refusing keys the config does not have."""
  top, key = path[0], ".".join(path)
  if top in _SCALARS:
    if len(path) > 1:
      raise ValueError(f"unknown config key {key!r}: {top} has no sub-keys")
    raw[top] = value
    return
  if top not in _SECTIONS:
    raise _unknown_key(key, f": top-level keys are {_KNOWN}")
  if len(path) == 1:
    raise ValueError(f"override {top!r} needs a field, e.g. {top}.<field>=value")
  names = {f.name for f in dataclasses.fields(_SECTIONS[top])}
  if path[1] not in names:
    raise _unknown_key(key)
  if len(path) > 2 and (top, path[1]) not in _MAPPING_FIELDS:
    raise ValueError(f"unknown config key {key!r}: {path[1]} has no sub-keys")
  node = raw.setdefault(top, {})
  if not isinstance(node, dict):
    raise ValueError(f"config section {top!r} must be a mapping, got {node!r}")
  for part in path[1:-1]:
    child = node.get(part)
    if not isinstance(child, dict):
      child = {}
      node[part] = child
    node = child
  node[path[-1]] = value


def config_from_dict(raw: Mapping[str, Any]) -> Config:
  """Builds a Config from nested dicts, naming any unknown key."""
  if not isinstance(raw, Mapping):
    raise ValueError(f"config must be a mapping of sections, got {type(raw).__name__}")
  values: dict[str, Any] = {}
  for name, section in raw.items():
    if name in _SCALARS:
      values[name] = section
      continue
    if name not in _SECTIONS:
      raise _unknown_key(name, f": top-level keys are {_KNOWN}")
    if not isinstance(section, Mapping):
      raise ValueError(f"config section {name!r} must be a mapping, got {section!r}")
    cls = _SECTIONS[name]
    names = {f.name for f in dataclasses.fields(cls)}
    for key in section:
      if key not in names:
        raise _unknown_key(f"{name}.{key}")
    values[name] = cls(**section)
  return Config(**values)


def _yaml_problem(err: yaml.YAMLError) -> str:
  """'found ... at line L column C' from a PyYAML error, without its multi-line excerpt."""
  mark = getattr(err, "problem_mark", None)
  problem = getattr(err, "problem", None) or type(err).__name__
  return problem if mark is None else f"{problem} at line {mark.line + 1} column {mark.column + 1}"


def read_yaml(path: Path) -> Any:
  """A YAML file's contents. Raises ValueError naming the file for a syntax error or a key given
  twice in one mapping (with the line and column), and for a file with no YAML document in it
  (empty, or comments only), which would otherwise read as None."""
  text = Path(path).read_text()
  try:
    value = parse_yaml(text)
  except yaml.YAMLError as err:
    raise ValueError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(err)}; "
                     "fix that line") from None
  if value is None:
    raise ValueError(f"config file {str(path)!r} {_holds_nothing(text)}: write its sections "
                     "(model:, train:, ...), or give no config for the built-in defaults")
  return value


def _holds_nothing(text: str) -> str:
  """How a YAML text that parsed to nothing looks: empty, or lines 1-N blank or comments."""
  lines = len(text.splitlines())
  if not lines:
    return "is empty"
  return f"holds no YAML (line{'s 1-' if lines > 1 else ' '}{lines} blank or comments only)"


def presets() -> list[str]:
  """Names of the configs shipped with the package (`mla-jax info deepseek_v2`)."""
  return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_config_path(text: str | Path) -> Path:
  """A config argument -> a YAML file: an existing path, else a preset by name (`tiny`,
  `tiny.yaml`, or `configs/tiny.yaml` from any directory). ValueError says what is there instead."""
  path = Path(text).expanduser()
  if path.is_file():
    return path
  if path.is_dir():
    inside = " (a training workdir: give its config.yaml)" if (path / "config.yaml").is_file() else ""
    raise ValueError(f"config {str(text)!r} is a directory{inside}; expected a YAML file or a "
                     f"preset name ({', '.join(presets())})")
  name = path.name[:-5] if path.name.endswith(".yaml") else path.name
  if path.parent in (Path("."), Path("configs")) and (PRESETS_DIR / f"{name}.yaml").is_file():
    return PRESETS_DIR / f"{name}.yaml"
  raise ValueError(f"config file {str(text)!r} does not exist, and no preset is called {name!r}"
                   f"{_did_you_mean(name, presets())}; presets: {', '.join(presets())}")


def load_config(path: Optional[str | Path], *overrides: str) -> Config:
  """Reads a YAML config (a path or a preset name; None: the built-in defaults) and applies
  dotted overrides such as 'model.kv_lora_rank=64'. workdir=None is resolved to
  runs/<file stem>-<run_id> (see Config)."""
  raw: Any = {}
  name = DEFAULT_NAME
  if path is not None:
    file = resolve_config_path(path)
    name = file.stem
    raw = read_yaml(file)
    if not isinstance(raw, dict):
      raise ValueError(f"config file {str(path)!r} must hold a mapping of sections")
  for text in overrides:
    _apply_override(raw, *_parse_override(text))
  return config_from_dict(raw).with_default_workdir(name)


def load_config_args(items: list[str]) -> Config:
  """The command line's `[CONFIG] [key=value ...]`: CONFIG is optional, so a first item with
  '=' is already an override. A key given without '=' (`model.hidden_size 64`) is answered
  with the override that was probably meant."""
  keys = set(config_keys())
  for i, item in enumerate(items):
    if "=" not in item and (item in keys or item.split(".")[0] in _SECTIONS and "." in item):
      value = items[i + 1] if i + 1 < len(items) and "=" not in items[i + 1] else "VALUE"
      raise ValueError(f"{item!r} is a config key, not a file: did you mean {item}={value}?")
  if items and "=" not in items[0]:
    return load_config(items[0], *items[1:])
  return load_config(None, *items)
