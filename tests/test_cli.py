import subprocess
import sys
from pathlib import Path

import pytest

import mla_jax
from mla_jax.cli import count_params, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_version(capsys):
  with pytest.raises(SystemExit) as exit_info:
    main(["--version"])
  assert exit_info.value.code == 0
  assert capsys.readouterr().out.strip() == f"mla-jax {mla_jax.__version__}"


def test_info_prints_params_and_cache_bytes(capsys):
  assert main(["info", str(CONFIGS / "deepseek_v2.yaml")]) == 0
  out = capsys.readouterr().out
  assert "kv cache per token per layer: 576 elements (c_kv 512 + k_rope 64) = 1,152 bytes" in out
  assert "kv cache per token, all 60 layers: 34,560 elements = 69,120 bytes" in out


def test_info_applies_overrides_and_counts_params_exactly(capsys):
  assert main(["info", str(CONFIGS / "tiny.yaml"), "model.attention=mqa"]) == 0
  out = capsys.readouterr().out
  cfg = mla_jax.load_config(CONFIGS / "tiny.yaml", "model.attention=mqa").model
  # mqa: one kv head of keys 32+16 and values 32 = 80 elements, float32.
  assert "kv cache per token per layer: 80 elements (1 kv heads x (k 48 + v 32)) = 320 bytes" in out
  # Hand count of the tiny MQA model: embeddings, head, final norm, and per layer the attention
  # (q 128x4x48, k 128x48, v 128x32, o 4x32x128), SwiGLU (3 x 128x384) and two norms.
  per_layer = 128 * 4 * 48 + 128 * 48 + 128 * 32 + 4 * 32 * 128 + 3 * 128 * 384 + 2 * 128
  assert count_params(cfg) == 2 * 260 * 128 + 128 + 4 * per_layer
  assert f"parameters: {2 * 260 * 128 + 128 + 4 * per_layer:,}" in out


def test_bad_override_is_one_clear_line(capsys):
  assert main(["info", str(CONFIGS / "tiny.yaml"), "model.kv_lora_rank=-3"]) == 2
  err = capsys.readouterr().err
  assert err.strip() == "mla-jax: error: model.kv_lora_rank=-3 is invalid: must be > 0"


def test_console_script_is_installed():
  script = Path(sys.executable).parent / "mla-jax"  # the venv's bin, activated or not
  result = subprocess.run([str(script), "info", str(CONFIGS / "tiny.yaml")],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "kv cache per token per layer: 48 elements" in result.stdout
