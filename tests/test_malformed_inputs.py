"""Malformed files a real user gives: each is refused with a message naming the file, field or
tensor and what to do, and `mla-jax` prints it as one line with a non-zero exit.

The Hugging Face directory here is written with NumPy alone (no transformers): these tests are
about refusals, not parity (tests/test_hf.py checks parity)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mla_jax.checkpoint import CheckpointError
from mla_jax.cli import main
from mla_jax.config import ModelConfig, load_config
from mla_jax.tokenizers import ByteTokenizer, load_tokenizer
from mla_jax.hf import convert_hf, load_hf, model_config_from_hf, tensor_map
from mla_jax.workdir import load_trained

safetensors_numpy = pytest.importorskip("safetensors.numpy")

HF_CONFIG = dict(model_type="deepseek_v2", vocab_size=300, hidden_size=32, intermediate_size=48,
                 num_hidden_layers=1, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=16,
                 qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                 max_position_embeddings=64, rms_norm_eps=1e-6, eos_token_id=1)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A valid tiny DeepseekV2 directory: config.json and one model.safetensors, no tokenizer."""
  directory = tmp_path_factory.mktemp("hf")
  (directory / "config.json").write_text(json.dumps(HF_CONFIG))
  rng = np.random.default_rng(0)
  shapes = {name: shape for name, (shape, _) in tensor_map(model_config_from_hf(HF_CONFIG)).items()}
  safetensors_numpy.save_file({name: rng.normal(size=shape).astype(np.float32)
                               for name, shape in sorted(shapes.items())},
                              str(directory / "model.safetensors"))
  return directory


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
  """`mla-jax convert` output of hf_dir (which has no tokenizer.json), and convert's notes."""
  notes = []
  workdir = convert_hf(hf_dir, tmp_path_factory.mktemp("out") / "converted", log=notes.append)
  return workdir, notes


def _copy(directory: Path, to: Path) -> Path:
  to.mkdir(parents=True)
  for f in directory.iterdir():
    (to / f.name).write_bytes(f.read_bytes())
  return to


# Each malformed input: how to make it from hf_dir (a copy), and a regex of the whole message.

def _missing_field(d):
  (d / "config.json").write_text(json.dumps({k: v for k, v in HF_CONFIG.items()
                                             if k != "kv_lora_rank"}))
  return re.escape(f"{d / 'config.json'} has no 'kv_lora_rank', which a DeepseekV2/V3 config "
                   "needs: the file is incomplete or not a DeepSeek config; download it again")


def _truncated_config(d):
  text = (d / "config.json").read_text()
  (d / "config.json").write_text(text[:len(text) // 2])
  return re.escape(f"{d / 'config.json'} is not valid JSON (") + r"[^()]+ at line 1 column \d+" + (
      re.escape("): the file is truncated or damaged; download it again"))


def _html_config(d):
  (d / "config.json").write_text("<html>404: Not Found</html>")
  return re.escape(f"{d / 'config.json'} is not valid JSON (Expecting value at line 1 column 1): "
                   "the file is truncated or damaged; download it again")


def _safetensors_header_not_json(d):
  data = bytearray((d / "model.safetensors").read_bytes())
  data[8:16] = b"not json"
  (d / "model.safetensors").write_bytes(bytes(data))
  return re.escape(f"{d / 'model.safetensors'} is not a safetensors file: its header is not a "
                   "JSON object; the file is truncated or damaged; download it again")


def _safetensors_cut_in_half(d):
  data = (d / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(data[:len(data) // 2])
  held = len(data) // 2 - 8 - int.from_bytes(data[:8], "little")  # data bytes left
  return (re.escape(f"{d / 'model.safetensors'} is truncated: tensor ") + r"model\.[\w.]+ needs "
          r"data bytes \[[\d,]+, [\d,]+\) but the file holds " + re.escape(f"{held:,}; download it "
                                                                          "again"))


def _safetensors_cut_in_header(d):
  (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100])
  return re.escape(f"{d / 'model.safetensors'} is not a complete safetensors file (100 bytes, "
                   "shorter than the header it announces): the file is truncated or damaged; "
                   "download it again")


def _groups_of_one_expert(d):
  (d / "config.json").write_text(json.dumps({
      **HF_CONFIG, "model_type": "deepseek_v3", "n_routed_experts": 4, "num_experts_per_tok": 2,
      "moe_intermediate_size": 16, "n_group": 4, "topk_group": 2}))
  return re.escape(f"{d / 'config.json'}: model.n_group=4 is invalid: with topk_method=noaux_tc "
                   "a group's score is the sum of its top-2 experts, so each group needs >= 2 of "
                   "the n_routed_experts=4: n_group must be <= 2")


HF_FAULTS = [_missing_field, _truncated_config, _html_config, _safetensors_header_not_json,
             _safetensors_cut_in_half, _safetensors_cut_in_header, _groups_of_one_expert]


@pytest.mark.parametrize("fault", HF_FAULTS, ids=lambda f: f.__name__.strip("_"))
def test_malformed_hf_directories_are_named(hf_dir, tmp_path, fault):
  directory = _copy(hf_dir, tmp_path / "hf")
  pattern = fault(directory)
  with pytest.raises(ValueError) as error:
    load_hf(directory)
  assert re.fullmatch(pattern, str(error.value)), str(error.value)


def test_config_fields_of_the_wrong_type_are_named():
  with pytest.raises(ValueError, match=r"^config.json: kv_lora_rank='16' is invalid: expected int$"):
    model_config_from_hf({**HF_CONFIG, "kv_lora_rank": "16"})
  with pytest.raises(ValueError, match=r"^x/config.json must hold a JSON object, got list$"):
    model_config_from_hf([1, 2], "x/config.json")
  with pytest.raises(ValueError, match="num_nextn_predict_layers=-1 is invalid: must be >= 0"):
    model_config_from_hf({**HF_CONFIG, "num_nextn_predict_layers": -1})


def test_groups_of_one_expert_are_refused_only_for_noaux_tc():
  moe = dict(n_routed_experts=4, num_experts_per_tok=2, n_group=4, topk_group=2)
  with pytest.raises(ValueError, match=r"^model\.n_group=4 is invalid: with topk_method=noaux_tc"):
    ModelConfig(scoring_func="sigmoid", topk_method="noaux_tc", **moe)
  ModelConfig(scoring_func="sigmoid", topk_method="noaux_tc", **{**moe, "n_group": 2})  # 2 each
  ModelConfig(topk_method="group_limited_greedy", **moe)  # V2 ranks groups by their best expert


def test_yaml_syntax_errors_name_the_file_line_and_column(tmp_path):
  path = tmp_path / "bad.yaml"
  path.write_text("model:\n  kv_lora_rank: [32\n  hidden_size: 64\n")
  with pytest.raises(ValueError) as error:
    load_config(path)
  assert str(error.value) == (f"config file {str(path)!r} is not valid YAML: expected ',' or ']', "
                              "but got ':' at line 3 column 14; fix that line")
  with pytest.raises(ValueError, match=r"^override 'model.kv_lora_rank=\[3' is invalid: its value "
                                       r"is not YAML \(expected ',' or '\]'"):
    load_config(None, "model.kv_lora_rank=[3")


def test_damaged_orbax_checkpoints_are_named(converted, tmp_path):
  import shutil

  workdir, _ = converted
  step = tmp_path / "w" / "checkpoints" / "0"
  for damage in ("meta/metadata", "params/_METADATA", "params/manifest.ocdbt"):
    shutil.rmtree(tmp_path / "w", ignore_errors=True)
    shutil.copytree(workdir, tmp_path / "w")
    (step / damage).write_text('{"truncated')
    with pytest.raises(CheckpointError) as error:
      load_trained(tmp_path / "w")
    message = str(error.value)
    assert message.startswith(f"checkpoint {step.resolve()} cannot be read (")
    assert message.endswith("): it is damaged or incomplete; delete that directory to fall back "
                            "to an earlier checkpoint, or write it again (train or convert)")
    if damage == "params/manifest.ocdbt":  # tensorstore's words, after the file it names
      assert f"({step.resolve() / damage}: Error decoding manifest: " in message
    else:
      assert f"({step.resolve() / damage} is not valid JSON)" in message
    assert "\n" not in message


def test_converted_checkpoint_without_tokenizer_refuses_text(hf_dir, converted, capsys, tmp_path):
  """Text prompts would be tokenized as bytes, which this model never saw: refused, saying what
  to supply (convert said so too); token-id prompts keep working (--prompt-ids; mla_jax.generate from Python)."""
  import mla_jax

  workdir, notes = converted
  assert notes == [f"no tokenizer.json in {hf_dir}: `mla-jax generate` will refuse text prompts "
                   f"on {workdir} until you copy the model's tokenizer.json there"]
  assert main(["generate", "--checkpoint", str(workdir), "--prompt", "Hello"]) == 2
  assert capsys.readouterr().err == (
      f"mla-jax: error: {workdir} was converted from a checkpoint without tokenizer.json, so text "
      "prompts cannot be tokenized: copy the model's tokenizer.json (from the Hugging Face "
      f"directory or repository it came from) into {workdir}; or give token ids with "
      "--prompt-ids, e.g. --prompt-ids 1,2,3\n")
  config, params = load_trained(workdir)
  out = mla_jax.generate(mla_jax.Transformer(config.model), params, [[5, 299, 7]],
                         max_new_tokens=3)
  assert out.shape == (1, 6) and out[0, :3].tolist() == [5, 299, 7]
  # A workdir with neither tokenizer.json nor the converted marker, whose vocabulary is too small
  # for bytes (the fault's "eos_id=256" case): refused by size.
  with pytest.raises(ValueError, match=r"has no tokenizer.json and its model's vocab_size=97 is "
                                       r"smaller than the byte tokenizer's 259 ids"):
    load_tokenizer(tmp_path, vocab_size=97)
  assert isinstance(load_tokenizer(tmp_path, vocab_size=260), ByteTokenizer)
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(ValueError, match=r"tokenizer.json is not a tokenizer the tokenizers library "
                                       r"can read \(.*\): copy the model's tokenizer.json there"):
    load_tokenizer(tmp_path)


def test_cli_prints_one_line_for_each_malformed_input(hf_dir, converted, tmp_path):
  """Every malformed input of the issue through the installed `mla-jax`: one line on stderr,
  `mla-jax: error: ...` naming the file, field or tensor, exit status 2, no traceback."""
  script = Path(sys.executable).parent / "mla-jax"
  runs = {}
  for fault in (_missing_field, _truncated_config, _safetensors_header_not_json,
                _safetensors_cut_in_half, _groups_of_one_expert):  # the list
    directory = _copy(hf_dir, tmp_path / fault.__name__)
    runs[fault.__name__] = (["convert", "--from-hf", str(directory), "--out",
                             str(tmp_path / f"out{fault.__name__}")], fault(directory))
  runs["dtype"] = (["convert", "--from-hf", str(hf_dir), "--out", str(tmp_path / "o"), "--dtype",
                    "int8"], re.escape("dtype='int8' is not supported: allowed float32, bfloat16, "
                                       "float16 (or bf16, fp32, fp16)"))
  yaml_file = tmp_path / "bad.yaml"
  yaml_file.write_text("model:\n  kv_lora_rank: [32\n  hidden_size: 64\n")
  runs["yaml"] = (["info", str(yaml_file)], re.escape(
      f"config file {str(yaml_file)!r} is not valid YAML: expected ',' or ']', but got ':' at line "
      "3 column 14; fix that line"))
  groups = tmp_path / "groups.yaml"
  groups.write_text("model: {n_routed_experts: 4, n_group: 4, topk_group: 2, scoring_func: "
                    "sigmoid, topk_method: noaux_tc}\n")
  runs["n_group"] = (["info", str(groups)], re.escape(
      "model.n_group=4 is invalid: with topk_method=noaux_tc a group's score is the sum of its "
      "top-2 experts, so each group needs >= 2 of the n_routed_experts=4: n_group must be <= 2"))
  import shutil

  damaged = tmp_path / "damaged"
  shutil.copytree(converted[0], damaged)
  (damaged / "checkpoints" / "0" / "params" / "_METADATA").write_text("{")
  (damaged / "special_tokens.json").unlink()  # bytes fit its 300 ids: on to the checkpoint
  step = (damaged / "checkpoints" / "0").resolve()
  runs["orbax"] = (["generate", "--checkpoint", str(damaged), "--prompt", "hi",
                    "--max-new-tokens", "3"], re.escape(
      f"checkpoint {step} cannot be read ({step / 'params' / '_METADATA'} is not valid JSON): it "
      "is damaged or incomplete; delete that directory to fall back to an earlier checkpoint, or "
      "write it again (train or convert)"))
  processes = {name: subprocess.Popen([str(script), *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
               for name, (args, _) in runs.items()}  # all at once: each is mostly JAX's import
  for name, process in processes.items():
    out, err = process.communicate(timeout=300)
    assert process.returncode == 2, (name, err)
    assert re.fullmatch("mla-jax: error: " + runs[name][1] + "\n", err), (name, err)
    assert out == "", name


# ---- Silent and unclear cases a new user hit: each refused by kind, in one line ---------------

@pytest.mark.parametrize("text, problem", [
    ("model:\n  kv_lora_rank: 16\n  hidden_size: 64\n  kv_lora_rank: 32\n",
     "is not valid YAML: duplicate key 'kv_lora_rank' (first at line 2; keep one) at line 4 "
     "column 3; fix that line"),
    ("model: {}\ntrain:\n  steps: 5\nmodel:\n  hidden_size: 64\n",
     "is not valid YAML: duplicate key 'model' (first at line 1; keep one) at line 4 column 1; "
     "fix that line"),
    ("", "is empty: write its sections (model:, train:, ...), or give no config for the built-in "
         "defaults"),
    ("# model:\n\n#   kv_lora_rank: 16\n", "holds no YAML (lines 1-3 blank or comments only): "
                                          "write its sections"),
])
def test_duplicate_keys_and_empty_yaml_files_are_refused(tmp_path, capsys, text, problem):
  """PyYAML keeps the last of two equal keys and reads an empty file as None (the defaults)."""
  path = tmp_path / "run.yaml"
  path.write_text(text)
  expected = f"config file {str(path)!r} {problem}"
  with pytest.raises(ValueError, match="^" + re.escape(expected)):
    load_config(path)
  assert main(["info", str(path)]) == 2
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith("mla-jax: error: " + expected)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
  path = tmp_path / "merge.yaml"
  path.write_text("model: &m {hidden_size: 64, num_heads: 2}\ntrain:\n  steps: 5\n")
  assert load_config(path).model.hidden_size == 64
  from mla_jax.config import parse_yaml

  assert parse_yaml("a: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n")["c"] == {"x": 3, "y": 2}


def test_prompt_file_that_is_not_utf8_names_the_file_and_byte_offset(tmp_path, capsys):
  """read_text's UnicodeDecodeError reached the user as 'codec can't decode byte 0xe9 in
  position 9', naming no file; the check runs before the checkpoint is read."""
  prompts = tmp_path / "latin1.txt"
  prompts.write_bytes("hello\ncafé au lait\n".encode("latin-1"))
  assert main(["generate", "--checkpoint", str(tmp_path / "nowhere"), "--prompt-file",
               str(prompts)]) == 2
  assert capsys.readouterr().err == (
      f"mla-jax: error: --prompt-file {str(prompts)!r} is not UTF-8 text: byte offset 9 (line 2) "
      "is 0xe9 (invalid continuation byte); save the file as UTF-8\n")


@pytest.mark.parametrize("args, message", [
    (["--temperature", "nan"], "temperature=nan is invalid: must be a finite number >= 0 (0 = "
                               "greedy, 1 = the model's own distribution)"),
    (["--temperature", "inf"], "temperature=inf is invalid: must be a finite number >= 0"),
    (["--top-p", "nan"], "top_p=nan is invalid: must be in (0, 1] (a finite number), or None for "
                         "no top-p"),
])
def test_cli_refuses_non_finite_sampling_options_in_one_line(tmp_path, capsys, args, message):
  """Checked from the workdir's config.yaml alone, before any weights are read."""
  from mla_jax.config import Config
  from mla_jax.workdir import write_config

  write_config(tmp_path, Config(workdir=str(tmp_path)))
  assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x", *args]) == 2
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith("mla-jax: error: " + message), line


def _damage(path: Path, kind: str) -> None:
  data = path.read_bytes()
  if kind == "truncated":
    path.write_bytes(data[:len(data) // 2])
  elif kind == "garbage":
    path.write_bytes(np.random.default_rng(1).integers(0, 256, max(len(data), 16),
                                                        dtype=np.uint8).tobytes())
  else:
    path.unlink()


@pytest.mark.parametrize("kind", ["truncated", "garbage", "missing"])
def test_generate_on_an_overwritten_checkpoint_says_it_is_damaged_in_one_line(converted, tmp_path,
                                                                              kind):
  """Files inside checkpoints/<step>/ truncated, overwritten with garbage or deleted: one line
  naming the checkpoint, never orbax's "Event loop is closed" tracebacks from its reader threads."""
  import shutil

  workdirs = {}
  for target in ("params/manifest.ocdbt", "data", "params/array_metadatas/process_0",
                 "meta/metadata"):
    if kind == "missing" and target == "params/array_metadatas/process_0":
      continue  # orbax does not need it to restore: the parameters load intact
    workdir = tmp_path / target.replace("/", "_")
    shutil.copytree(converted[0], workdir)
    (workdir / "special_tokens.json").unlink()  # bytes fit its 300 ids: on to the checkpoint
    step = workdir / "checkpoints" / "0"
    if target == "data":  # the largest file of the OCDBT store: the arrays themselves
      target = str(max((step / "params" / "d").iterdir(),
                       key=lambda p: p.stat().st_size).relative_to(step))
    _damage(step / target, kind)
    workdirs[target] = workdir
  processes = {target: subprocess.Popen(
      [str(Path(sys.executable).parent / "mla-jax"), "generate", "--checkpoint", str(workdir),
       "--prompt", "hi", "--max-new-tokens", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for target, workdir in workdirs.items()}
  for target, process in processes.items():
    out, err = process.communicate(timeout=300)
    step = (workdirs[target] / "checkpoints" / "0").resolve()
    assert process.returncode == 2, (target, err)
    assert re.fullmatch(re.escape(f"mla-jax: error: checkpoint {step} cannot be read (") + r".+"
                        + re.escape("): it is damaged or incomplete; delete that directory to fall "
                                    "back to an earlier checkpoint, or write it again (train or "
                                    "convert)\n"), err), (target, err)
    assert f"{step}/{target.split('/')[0]}" in err  # the part of the checkpoint that failed
    assert "Event loop is closed" not in err and "Traceback" not in err


def test_a_failed_restore_silences_only_closed_event_loop_reports(converted, tmp_path,
                                                                 monkeypatch):
  """The deterministic half of the test above: after a restore, what orbax's reader threads
  report (through sys.unraisablehook) is dropped for that one message, passed on for any other."""
  import shutil
  import types

  reported = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(str(u.exc_value)))
  shutil.copytree(converted[0], tmp_path / "w")
  _damage(tmp_path / "w" / "checkpoints" / "0" / "params" / "manifest.ocdbt", "truncated")
  with pytest.raises(CheckpointError):
    load_trained(tmp_path / "w")
  reported.clear()  # what the failed restore itself reported
  for message in ("Event loop is closed", "something else"):
    sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError,
                                             exc_value=RuntimeError(message), exc_traceback=None,
                                             err_msg=None, object=None))
  assert reported == ["something else"]
  from orbax.checkpoint._src.serialization import serialization  # an abandoned orbax read

  read = serialization.async_deserialize(None, None)  # a coroutine, never run
  sys.unraisablehook(types.SimpleNamespace(exc_type=Exception, exc_value=Exception("read"),
                                           exc_traceback=None, err_msg=None, object=read))
  read.close()
  assert reported == ["something else"]


def _tokenizer_json(vocab: int) -> str:
  """A minimal word-level tokenizer.json with ids 0..vocab-1."""
  return json.dumps({"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
                     "normalizer": None, "pre_tokenizer": {"type": "Whitespace"},
                     "post_processor": None, "decoder": None,
                     "model": {"type": "WordLevel", "unk_token": "t0",
                               "vocab": {f"t{i}": i for i in range(vocab)}}})


@pytest.mark.parametrize("fault", ["tokenizer_not_json", "tokenizer_ids_past_vocab",
                                   "integer_weights"])
def test_convert_refuses_before_writing_anything(hf_dir, tmp_path, fault):
  directory = _copy(hf_dir, tmp_path / "hf")
  if fault == "tokenizer_not_json":
    (directory / "tokenizer.json").write_text("<html>404: Not Found</html>")
    expected = re.escape(f"{directory / 'tokenizer.json'} is not valid JSON (Expecting value at "
                         "line 1 column 1): the file is truncated or damaged; download it again")
  elif fault == "tokenizer_ids_past_vocab":
    (directory / "tokenizer.json").write_text(_tokenizer_json(400))
    expected = re.escape(f"{directory / 'tokenizer.json'} has token ids up to 399, beyond the "
                         "model's vocab_size=300 (ids 0..299): it is another model's tokenizer; "
                         "copy the one from this model's repository")
  else:
    tensors = dict(safetensors_numpy.load_file(str(directory / "model.safetensors")))
    tensors["model.norm.weight"] = np.ones(32, np.int8)
    safetensors_numpy.save_file(tensors, str(directory / "model.safetensors"))
    expected = re.escape(f"tensor model.norm.weight in {directory / 'model.safetensors'} has "
                         "integer dtype int8: mla-jax converts floating-point weights (float32, "
                         "bfloat16, float16, FP8 with scales); give the model's unquantized "
                         "safetensors")
  with pytest.raises(ValueError) as error:
    convert_hf(directory, tmp_path / "out", log=lambda _: None)
  assert re.fullmatch(expected, str(error.value)), str(error.value)
  assert not (tmp_path / "out").exists()  # no half-written workdir


def test_convert_copies_a_tokenizer_that_fits(hf_dir, tmp_path):
  directory = _copy(hf_dir, tmp_path / "hf")
  (directory / "tokenizer.json").write_text(_tokenizer_json(300))
  out = convert_hf(directory, tmp_path / "out", log=lambda _: None)
  assert load_tokenizer(out).encode("t5 t299") == [5, 299]
