import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
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



def test_info_shows_the_train_steps_attention_memory_per_path(capsys):
  # tiny.yaml: 4 layers, 4 heads; one sequence of 8,192: 4 x 8192^2 x 4 bytes = 1 GiB a layer.
  assert main(["info", "model.max_seq_len=8192", "train.seq_len=8192", "train.batch_size=1"]) == 0
  lines = capsys.readouterr().out.splitlines()
  start = lines.index("train step attention at train.seq_len=8,192, batch 1 on one device: "
                      "flash_attention (train.attn_impl=auto)")
  assert lines[start + 1] == ("  naive keeps each layer's [B,H,T,T] float32 softmax for the "
                              "backward pass: 4 x 1.00 GiB; 4.00 GiB kept in all")
  assert lines[start + 2].startswith("  flash_attention keeps each layer's [B,H,T] log-sum-exp "
                                     "for the backward pass: 4 x 128.0 KiB, and computes the "
                                     "scores one [B,H,256,256] block at a time (1.0 MiB)")
  assert main(["info", "train.attn_impl=naive", "train.remat=full"]) == 0
  out = capsys.readouterr().out  # remat keeps one layer's at a time
  assert "batch 16 on one device: naive (train.attn_impl=naive)" in out
  assert "for the backward pass: 1 x 4.0 MiB; 4.0 MiB kept in all" in out


def test_info_counts_the_mtp_module_apart(capsys):
  """configs/tiny_mtp.yaml: tiny's 862,720 parameters and one MTP module, a block of tiny's
  (199,008: its total less embeddings, head and norm, over 4 layers) plus eh_proj [256,128] and
  three norms."""
  assert main(["info", str(CONFIGS / "tiny_mtp.yaml")]) == 0
  module = (862_720 - 2 * 260 * 128 - 128) // 4 + 2 * 128 * 128 + 3 * 128
  assert (f"parameters: {862_720 + module:,} (of which {module:,} in 1 multi-token-prediction "
          "module(s))") in capsys.readouterr().out


@pytest.mark.parametrize("cache_dtype, per_layer", [
    ("bfloat16", 48 * 2),  # c_kv 32 + k_rope 16, two bytes each
    ("int8", 32 + 4 + 16 * 2),  # int8 latent, its float32 scale, bfloat16 k_rope
    ("int4", 16 + 4 + 16 * 2),  # two latent values per byte
])
def test_info_counts_the_cache_as_stored(capsys, cache_dtype, per_layer):
  """The cache lines follow model.cache_dtype (not model.dtype), and a quantized MLA cache is
  described rather than refused by the MHA comparison line."""
  assert main(["info", str(CONFIGS / "tiny.yaml"), f"model.cache_dtype={cache_dtype}"]) == 0
  out = capsys.readouterr().out
  assert f"(c_kv 32 + k_rope 16) = {per_layer:,} bytes" in out
  assert f"all 4 layers: 192 elements = {4 * per_layer:,} bytes" in out
  assert "15.00% of its cache" in out


def test_info_compares_grouped_rope_keys_with_mha(capsys):
  """An MLA model with several RoPE keys (what convert-to-mla writes for an exact GQA conversion)
  is compared with MHA of its heads, whose keys are one group each, rather than refused."""
  assert main(["info", str(CONFIGS / "tiny.yaml"), "model.qk_rope_head_dim=32",
               "model.qk_rope_groups=2"]) == 0
  out = capsys.readouterr().out
  assert "kv cache per token per layer: 64 elements" in out
  # MHA: 4 heads x (k 32 + 32 + v 32) = 384 elements; 64 / 384.
  assert "vs MHA with the same heads (384 elements per token per layer): 16.67% of its cache" in out


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


# ---- Issue 9: a command line a user can trust -------------------------------------------------

from tests.helpers import DATA, SMALL_MODEL  # noqa: E402

MLA_JAX = str(Path(sys.executable).parent / "mla-jax")
RUN = [f"data.path={DATA}", *SMALL_MODEL, "train.steps=6", "train.batch_size=8",
       "train.seq_len=32", "train.log_every=2", "train.eval_every=3", "train.eval_batches=1",
       "train.sample_tokens=0", "train.learning_rate=1e-3"]


@pytest.fixture(scope="module")
def default_workdir_run(tmp_path_factory):
  """`mla-jax train` with no workdir=, stderr and stdout not terminals (as in a log)."""
  cwd = tmp_path_factory.mktemp("cwd")
  result = subprocess.run([MLA_JAX, "train", *RUN], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr
  return cwd, result


def test_default_workdir_is_named_after_the_config_and_its_run_id(default_workdir_run):
  cwd, result = default_workdir_run
  run_id = mla_jax.load_config(None, *RUN).run_id()
  assert result.stdout.splitlines()[0] == (f"workdir: runs/tiny-{run_id} (new run; run id "
                                           f"{run_id})")
  assert (cwd / "runs" / f"tiny-{run_id}" / "checkpoints" / "6").is_dir()
  again = subprocess.run([MLA_JAX, "train", *RUN], cwd=cwd, capture_output=True, text=True,
                         timeout=300)
  assert again.returncode == 0 and again.stdout.startswith(
      f"workdir runs/tiny-{run_id}: already complete at step 6 (train.steps=6); nothing to do.")


def test_progress_is_a_line_every_log_every_steps_in_logs(default_workdir_run):
  """Item 11: without a terminal, no silent stretch: the compile, then every log_every steps."""
  _, result = default_workdir_run
  lines = result.stdout.splitlines()
  compiled = next(i for i, line in enumerate(lines) if line.startswith("compiled the train step"))
  steps = [line.split(":")[0] for line in lines[compiled:] if " loss " in line and "lr" in line]
  assert steps == ["step 2", "step 4", "step 6"]
  assert "train step memory: " in lines[compiled] and "from XLA's memory analysis" in lines[compiled]
  assert result.stderr == ""  # no progress bar when stderr is not a terminal


def test_generate_reports_step_blank_lines_and_rates_on_one_basis(default_workdir_run, tmp_path,
                                                                  capsys):
  cwd, _ = default_workdir_run
  workdir = str(next((cwd / "runs").iterdir()))
  assert main(["generate", "--checkpoint", workdir, "--prompt", "def ", "--max-new-tokens", "5",
               "--temperature", "0"]) == 0
  streamed = capsys.readouterr().err.splitlines()
  assert streamed[0] == f"loaded step 6 of {workdir}"
  assert streamed[1].startswith("compile: ") and " s (not counted below); generation: 4 prompt " \
      "tokens + 5 new tokens in " in streamed[1] and streamed[1].endswith(" new tokens/s")
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("def \n\nclass A:\n   \n")
  assert main(["generate", "--checkpoint", workdir, "--prompt-file", str(prompts),
               "--max-new-tokens", "5", "--temperature", "0"]) == 0
  captured = capsys.readouterr()
  batch = captured.err.splitlines()
  assert batch[0] == (f"--prompt-file {prompts}: skipped 2 blank line(s) (line 2, 4); "
                      "generating 2 prompt(s)")
  assert batch[1] == f"loaded step 6 of {workdir}"
  assert batch[2].startswith("compile: ") and " s (not counted below); generation: 12 prompt " \
      "tokens + 10 new tokens in " in batch[2] and batch[2].endswith(" new tokens/s; 2 prompts (12 tokens)")
  compile_s = float(batch[2].split()[1])
  assert compile_s > 0  # compilation happened in this call and was taken out of the rate
  assert captured.out.count("---") == 2


@pytest.mark.parametrize("argv, message", [
    (["info", "model.hidden_size", "64"],
     "'model.hidden_size' is a config key, not a file: did you mean model.hidden_size=64?"),
    (["info", "train.lerning_rate=1"], "unknown config key 'train.lerning_rate' (did you mean "
     "'train.learning_rate'"),
    (["info", str(CONFIGS)], f"config '{CONFIGS}' is a directory; expected a YAML file"),
    (["generate", "--checkpoint", str(CONFIGS / "tiny.yaml"), "--prompt", "x"],
     f"workdir '{CONFIGS / 'tiny.yaml'}' is a file; expected a workdir directory"),
    (["generate", "--checkpoint", "runs/x", "--prompt-file", str(CONFIGS)],
     f"--prompt-file '{CONFIGS}' is a directory; expected a text file"),
    (["convert", "--from-hf", str(CONFIGS / "tiny.yaml"), "--out", "x"],
     f"--from-hf '{CONFIGS / 'tiny.yaml'}' is a file; expected the model's directory"),
])
def test_mistakes_get_one_line_that_says_what_to_do(capsys, argv, message):
  """Item 10: did-you-mean for keys (difflib), and a directory or file where the other is due."""
  assert main(argv) == 2
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith("mla-jax: error: ") and message in line, line


@pytest.mark.parametrize("command, shown", [
    ("generate", ["--max-new-tokens MAX_NEW_TOKENS", "(default: 200)", "0 for greedy (default: "
                  "0.8)", "(default: None)", "sampling seed (default: 0)"]),
    ("convert", ["(default: auto)", "bfloat16 stays bfloat16"]),
    ("train", ["workdir: where the run lives", "runs/<config name>-<run id>",
               "already complete at step N", "130 stopped by", "(default: False)"]),
    ("info", ["deepseek_v2", "(default: the built-in tiny model)"]),
])
def test_help_shows_every_default(capsys, command, shown):
  with pytest.raises(SystemExit) as exit_info:
    main([command, "--help"])
  assert exit_info.value.code == 0
  text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
  for piece in shown:
    assert " ".join(piece.split()) in text, piece


@pytest.mark.parametrize("declared, expected", [("bfloat16", "bfloat16"), ("float32", "float32"),
                                                ("float16", "float32"), (None, "float32")])
def test_convert_keeps_the_checkpoints_dtype_by_default(tmp_path, declared, expected):
  from mla_jax.cli import checkpoint_dtype

  config = {"architectures": ["DeepseekV2ForCausalLM"]}
  if declared:
    config["torch_dtype"] = declared
  (tmp_path / "config.json").write_text(__import__("json").dumps(config))
  assert checkpoint_dtype(tmp_path)[0] == expected


def test_presets_work_from_any_directory(tmp_path):
  """Item 9: the configs ship with the package; names and the README's paths both work."""
  outputs = {}
  for argument in ("deepseek_v2", "configs/tiny.yaml"):
    result = subprocess.run([MLA_JAX, "info", argument], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"config: {argument}\nattention: mla")
    outputs[argument] = result.stdout
  assert "576 elements (c_kv 512 + k_rope 64)" in outputs["deepseek_v2"]
  assert "48 elements (c_kv 32 + k_rope 16)" in outputs["configs/tiny.yaml"]


@pytest.mark.slow
def test_wheel_contains_the_presets(tmp_path):
  """Item 9: a wheel (not only this editable install) carries configs/*.yaml as package data."""
  import zipfile

  root = CONFIGS.parent
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(root), "-w",
                  str(tmp_path)], check=True, timeout=600, cwd=tmp_path)
  (wheel,) = tmp_path.glob("mla_jax-*.whl")
  names = set(zipfile.ZipFile(wheel).namelist())
  assert {f"mla_jax/configs/{p.name}" for p in CONFIGS.glob("*.yaml")} <= names


def test_the_command_imports_jax_only_after_its_signal_handlers():
  """Item 4: `import mla_jax` and the CLI module are light, so Ctrl-C during start-up is caught."""
  code = ("import sys, mla_jax, mla_jax.cli; assert 'jax' not in sys.modules; "
          "mla_jax.ModelConfig; print(mla_jax.Transformer.__name__)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "Transformer"


def test_overrides_may_follow_options(capsys):
  """`mla-jax train CONFIG --distributed key=value`: argparse alone rejects the override."""
  from mla_jax.cli import build_parser, parse_args

  args = parse_args(build_parser(), ["train", "tiny", "--distributed", "train.steps=2", "seed=1"])
  assert args.config == "tiny" and args.distributed and args.overrides == ["train.steps=2", "seed=1"]
  for extra in ("--bogus", "stray"):
    with pytest.raises(SystemExit):
      main(["train", "tiny", "--distributed", extra])
    assert f"unrecognized arguments: {extra}" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["workdir_is_a_file", "workdir_under_a_file", "out_is_a_file",
                                  "from_hf_missing", "config_json_not_an_object"])
def test_paths_that_cannot_work_are_refused_in_one_line_before_any_work(case, tmp_path, capsys):
  """Found by a new user: these raised FileExistsError/NotADirectoryError/AttributeError
  tracebacks, some only after the data was read and the step compiled."""
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text("[1, 2]")
  argv, expected = {
      "workdir_is_a_file": (["train", "train.steps=2", f"workdir={a_file}"],
                            f"workdir='{a_file}' is a file; give a directory path"),
      "workdir_under_a_file": (["train", "train.steps=2", f"workdir={a_file}/sub"],
                               f"workdir='{a_file}/sub' cannot be created: '{a_file}' is a file"),
      "out_is_a_file": (["convert", "--from-hf", str(hf), "--out", str(a_file), "--dtype",
                         "float32"], f"--out='{a_file}' is a file"),
      "from_hf_missing": (["convert", "--from-hf", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "o")], "does not exist"),
      "config_json_not_an_object": (["convert", "--from-hf", str(hf), "--out", str(tmp_path / "o")],
                                    "must hold a JSON object"),
  }[case]
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("mla-jax: error: ") and expected in err, err
  assert not (tmp_path / "o").exists()


WIDE_LATENT_WARNING = (
    "mla-jax: warning: model.kv_lora_rank + model.qk_rope_head_dim = 600 + 16 = 616 elements per "
    "token per layer is wider than MHA's cache with the same heads (4 heads x (k 48 + v 32) = "
    "320): the MLA cache is then larger than MHA's, by 296 elements per token per layer (1.93x "
    "its size); lower model.kv_lora_rank below 304 for a smaller one")


def test_info_warns_when_the_latent_is_wider_than_mhas_cache(capsys):
  assert main(["info", "model.kv_lora_rank=600"]) == 0
  captured = capsys.readouterr()
  assert captured.err.splitlines() == [WIDE_LATENT_WARNING]
  assert "vs MHA with the same heads (320 elements per token per layer): 192.50% of its cache" in (
      captured.out)
  assert main(["info", "model.kv_lora_rank=304"]) == 0  # 304 + 16 = 320: as wide, no warning
  assert main(["info", "model.kv_lora_rank=600", "model.attention=mha"]) == 0  # no latent at all
  assert capsys.readouterr().err == ""


def test_train_warns_when_the_latent_is_wider_than_mhas_cache(capsys, monkeypatch, tmp_path):
  import mla_jax.train.loop as loop

  def stop(config):
    raise loop.TrainingError("stopped by the test")

  monkeypatch.setattr(loop, "train", stop)
  assert main(["train", "model.kv_lora_rank=600", f"workdir={tmp_path / 'w'}"]) == 1
  assert capsys.readouterr().err.splitlines() == [WIDE_LATENT_WARNING,
                                                  "mla-jax: error: stopped by the test"]


def test_train_print_config_prints_the_resolved_yaml_and_trains_nothing(capsys, tmp_path,
                                                                        monkeypatch):
  """--print-config: the preset with its overrides and the resolved workdir, as YAML that
  reads back to the same Config; no workdir is made."""
  monkeypatch.chdir(tmp_path)
  assert main(["train", "tiny_mqa", "train.steps=50", "model.kv_lora_rank=8",
               "--print-config"]) == 0
  captured = capsys.readouterr()
  assert captured.err == ""
  expected = mla_jax.load_config("tiny_mqa", "train.steps=50", "model.kv_lora_rank=8")
  assert captured.out.startswith("model:\n  vocab_size: 260\n")
  assert f"\nworkdir: {expected.workdir}\n" in captured.out
  (tmp_path / "printed.yaml").write_text(captured.out)
  assert mla_jax.load_config(tmp_path / "printed.yaml") == expected
  assert sorted(p.name for p in tmp_path.iterdir()) == ["printed.yaml"]  # no runs/


@pytest.mark.parametrize("case", ["read_only_parent", "workdir_is_a_file", "workdir_under_a_file",
                                  "data_path_missing", "vocab_too_small"])
def test_train_config_errors_come_before_jax_is_imported(case, tmp_path):
  """Each config error of `train` is refused as fast as `mla-jax info` would: one line, exit 2,
  and JAX never imported (so no data was read and nothing compiled)."""
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  read_only = Path("/sys/mla-jax-test/run")  # sysfs: no directory can be made there, even by root
  override, expected = {
      "read_only_parent": (f"workdir={read_only}", re.escape(
          f"workdir='{read_only}' cannot be written: ") + r"(creating a directory in '/sys' failed "
          r"\([^)]+\)|no write permission in '/sys'); choose another directory"),
      "workdir_is_a_file": (f"workdir={a_file}", re.escape(
          f"workdir='{a_file}' is a file; give a directory path (new or existing)")),
      "workdir_under_a_file": (f"workdir={a_file}/sub", re.escape(
          f"workdir='{a_file}/sub' cannot be created: '{a_file}' is a file, not a directory")),
      "data_path_missing": (f"data.path={tmp_path}/nope.txt", re.escape(
          f"data.path='{tmp_path}/nope.txt' does not exist; give a text file, a directory of text "
          "files or a glob, or data.path=null for the Python standard library")),
      "vocab_too_small": ("model.vocab_size=100", re.escape(
          "model.vocab_size=100 is invalid: the byte tokenizer needs at least 259")),
  }[case]
  workdir = [] if override.startswith("workdir") else [f"workdir={tmp_path}/w"]
  code = ("import sys; from mla_jax.cli import main; rc = main(sys.argv[1:]); "
          "print('jax imported' if 'jax' in sys.modules else 'no jax'); sys.exit(rc)")
  result = subprocess.run([sys.executable, "-c", code, "train", override, *workdir],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr
  assert re.fullmatch("mla-jax: error: " + expected + "\n", result.stderr), result.stderr
  assert result.stdout == "no jax\n"
  assert not (tmp_path / "w").exists()


def _assert_stopped_by_sigint(process: subprocess.Popen) -> None:
  out, err = process.communicate(timeout=120)
  assert process.returncode == 130, (process.returncode, err)
  assert err.splitlines() == [
      "mla-jax: stopped by SIGINT before training started; no checkpoint was saved"], err
  assert "Traceback" not in err and "KeyboardInterrupt" not in err


@pytest.mark.parametrize("delay_s", [0.2, 0.5, 1.0])
def test_ctrl_c_in_the_first_second_of_train_exits_130_in_one_line(delay_s, tmp_path):
  """Ctrl-C while the command starts (imports, setup), before the training loop's handler."""
  import signal
  import time

  process = subprocess.Popen([MLA_JAX, "train", f"workdir={tmp_path / 'w'}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  time.sleep(delay_s)
  process.send_signal(signal.SIGINT)
  _assert_stopped_by_sigint(process)
  assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.parametrize("after", ["import mla_jax", "import mla_jax.config.loader",
                                   "from mla_jax.cli import build_parser"])
def test_ctrl_c_during_the_commands_imports_exits_130_in_one_line(after, tmp_path):
  """The same without a clock: the console script's start, with SIGINT sent at a known import."""
  code = (f"import os, signal, sys; sys.argv = ['mla-jax', 'train', 'workdir={tmp_path}/w']; "
          f"{after}; os.kill(os.getpid(), signal.SIGINT); from mla_jax.cli import main; "
          "sys.exit(main())")
  process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  _assert_stopped_by_sigint(process)


def _options_help(argv, capsys) -> str:
  """The options section of `mla-jax ARGV --help`, one line per option (argparse's wrapping
  undone)."""
  with pytest.raises(SystemExit) as exit_info:
    main([*argv, "--help"])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out.split("options:", 1)[1]
  return re.sub(r"\n {20,}", " ", text)


def test_help_prints_one_default_per_option_and_none_for_required_ones(capsys):
  """A bench option whose default depends on --quick shows both values as one default; a
  required option shows no "(default: None)"."""
  text = _options_help(["bench", "throughput"], capsys)
  assert "(default: None)" not in text
  for line in [l for l in text.splitlines() if l.lstrip().startswith("--")]:
    assert line.count("(default") == 1, line
  flat = " ".join(text.split())
  for shown in ["--context CONTEXT cache slots per sequence = prompt + new tokens (default: "
                "1024, with --quick: 24)",
                "--repeats REPEATS timed generate calls per attention (default: 3, with "
                "--quick: 1)",
                "(default: 4GiB, with --quick: 256KiB)",
                "(default: bench_results, with --quick: bench_results/quick, which git ignores"]:
    assert shown in flat, shown
  decode = " ".join(_options_help(["bench", "decode"], capsys).split())
  assert "(default: 2048,32768, with --quick: 16,64)" in decode and "(default: None)" not in decode
  for command, required in [("generate", "--checkpoint WORKDIR"), ("convert", "--from-hf DIR"),
                            ("convert", "--out WORKDIR")]:
    line = next(l for l in _options_help([command], capsys).splitlines()
                if l.strip().startswith(required))
    assert "default" not in line, line


from mla_jax.hf import convert_hf, model_config_from_hf, tensor_map  # noqa: E402
from tests.test_malformed_inputs import HF_CONFIG  # noqa: E402


@pytest.fixture(scope="module")
def converted_without_tokenizer(tmp_path_factory):
  """`mla-jax convert` of a tiny random DeepseekV2 directory (vocab 300, EOS 1) that has no
  tokenizer.json, as a Hugging Face download without its tokenizer is."""
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  hf = tmp_path_factory.mktemp("hf")
  (hf / "config.json").write_text(json.dumps(HF_CONFIG))
  rng = np.random.default_rng(0)
  shapes = {n: s for n, (s, _) in tensor_map(model_config_from_hf(HF_CONFIG)).items()}
  safetensors_numpy.save_file({n: rng.normal(size=s).astype(np.float32)
                               for n, s in sorted(shapes.items())}, str(hf / "model.safetensors"))
  return str(convert_hf(hf, tmp_path_factory.mktemp("out") / "converted", log=lambda _: None))


def test_load_run_of_a_converted_model_without_tokenizer(converted_without_tokenizer):
  run = mla_jax.load_run(converted_without_tokenizer)
  assert isinstance(run, mla_jax.Run)
  assert run.tokenizer is None and run.eos_id == 1 and run.step == 0
  assert run.config.model.vocab_size == 300 and run.model.config == run.config.model
  out = mla_jax.generate(run.model, run.params, [[5, 299, 7]], max_new_tokens=3, temperature=0)
  assert out.shape == (1, 6) and out[0, :3].tolist() == [5, 299, 7]


def test_generate_from_token_ids_without_a_tokenizer(converted_without_tokenizer, capsys):
  """--prompt-ids, repeated for a batch, prints each row's ids; they are mla_jax.generate's."""
  workdir = converted_without_tokenizer
  assert main(["generate", "--checkpoint", workdir, "--prompt", "Hello"]) == 2
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith(f"mla-jax: error: {workdir} was converted from a checkpoint without "
                         "tokenizer.json") and line.endswith(
      "; or give token ids with --prompt-ids, e.g. --prompt-ids 1,2,3"), line
  assert main(["generate", "--checkpoint", workdir, "--prompt-ids", "5,299,7",
               "--prompt-ids", "42", "--max-new-tokens", "4", "--temperature", "0"]) == 0
  captured = capsys.readouterr()
  run = mla_jax.load_run(workdir)
  out, lengths = mla_jax.generate(run.model, run.params, [[5, 299, 7], [42]], max_new_tokens=4,
                                  temperature=0, eos_id=1, pad_id=1, return_lengths=True)
  expected = []
  for prompt, row, length in zip(([5, 299, 7], [42]), out.tolist(), lengths.tolist()):
    new = ",".join(map(str, row[len(prompt):length]))
    expected += [f"ids: {','.join(map(str, prompt))} + {new}", "---"]
  assert captured.out.splitlines() == expected
  assert captured.err.splitlines()[0] == f"loaded step 0 of {workdir}"


@pytest.mark.parametrize("ids, message", [
    ("5,300", "--prompt-ids '5,300': id 300 is outside the model's vocabulary (ids 0 to 299)"),
    ("-1", "--prompt-ids '-1': id -1 is outside the model's vocabulary (ids 0 to 299)"),
    ("1,,2", "--prompt-ids '1,,2' is invalid: expected comma-separated token ids, e.g. 1,2,3"),
    ("", "--prompt-ids '' is invalid: expected comma-separated token ids"),
    ("a b", "--prompt-ids 'a b' is invalid: expected comma-separated token ids"),
])
def test_bad_prompt_ids_are_one_line(converted_without_tokenizer, capsys, ids, message):
  assert main(["generate", "--checkpoint", converted_without_tokenizer, "--prompt-ids", ids]) == 2
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith(f"mla-jax: error: {message}"), line


def test_prompt_ids_and_text_prompts_exclude_each_other(capsys):
  assert main(["generate", "--checkpoint", "runs/x", "--prompt", "a", "--prompt-ids", "1"]) == 2
  assert capsys.readouterr().err == ("mla-jax: error: give exactly one of --prompt TEXT, "
                                     "--prompt-file FILE or --prompt-ids IDS\n")


def test_prompt_ids_with_a_tokenizer_print_ids_and_text(default_workdir_run, capsys):
  """A trained workdir (byte tokenizer): the ids line, then the whole row decoded."""
  cwd, _ = default_workdir_run
  workdir = str(next((cwd / "runs").iterdir()))
  run = mla_jax.load_run(workdir)
  assert run.step == 6 and run.eos_id == 256 and run.tokenizer.decode([100, 101]) == "de"
  assert main(["generate", "--checkpoint", workdir, "--prompt-ids", "100,101,102",
               "--max-new-tokens", "5", "--temperature", "0"]) == 0
  out = capsys.readouterr().out
  (row,) = mla_jax.generate(run.model, run.params, [[100, 101, 102]], max_new_tokens=5,
                            temperature=0, eos_id=256, pad_id=257).tolist()
  new = [t for t in row[3:] if t != 257]
  assert out == (f"ids: 100,101,102 + {','.join(map(str, new))}\n"
                 f"{run.tokenizer.decode(row)}\n---\n")  # the text may hold any character


@pytest.mark.parametrize("argv, message", [
    (["generate", "--checkpoint", "x", "--seed", "1.5"],
     "mla-jax generate: error: argument --seed: invalid int value: '1.5' (see mla-jax generate "
     "--help)"),
    (["info", "--bogus"], "mla-jax: error: unrecognized arguments: --bogus (see mla-jax --help)"),
    (["bench", "memory", "--nope"], "mla-jax bench memory: error: unrecognized arguments: --nope "
                                    "(see mla-jax bench memory --help)"),
])
def test_usage_errors_are_one_line(argv, message, capsys):
  """argparse printed its usage block above the error; one line names the command instead."""
  with pytest.raises(SystemExit) as stopped:
    main(argv)
  assert stopped.value.code == 2
  assert capsys.readouterr().err == message + "\n"
