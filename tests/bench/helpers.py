"""Runs a bench suite through the real CLI and reads back what it wrote."""

import json
from pathlib import Path

from mla_jax.cli import main


def run_suite(suite: str, out: Path, *options: str, capsys=None) -> dict:
  """`mla-jax bench SUITE --quick --out OUT OPTIONS...`; returns its JSON, markdown and stdout."""
  assert main(["bench", suite, "--quick", "--out", str(out), *options]) == 0
  raw = json.loads((out / f"{suite}.json").read_text())
  png = (out / f"{suite}.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
  raw["markdown"] = (out / f"{suite}.md").read_text()
  raw["stdout"] = capsys.readouterr().out if capsys is not None else ""
  return raw


def rows(raw: dict, table: int = 0) -> list[dict]:
  return raw["tables"][table]["rows"]


def check_header(raw: dict, suite: str) -> None:
  """Every table starts with machine, device kind, JAX version, dtype and the command."""
  import jax

  header = raw["header"]
  assert header[0].startswith("machine: ")
  assert header[1].startswith("device: ") and jax.devices()[0].device_kind in header[1]
  assert header[2].startswith(f"jax {jax.__version__}, dtype ")
  assert header[3].startswith(f"command: `mla-jax bench {suite} --quick")
  for line in header:
    assert f"- {line}" in raw["markdown"]
