import dataclasses
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import mla_jax
from mla_jax.config import (ModelConfig, YarnScaling, load_config, load_config_args, presets,
                            yarn_get_mscale)

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


def test_defaults_are_valid_and_derived_sizes():
  cfg = ModelConfig(num_heads=4, qk_nope_head_dim=32, qk_rope_head_dim=16)
  assert cfg.qk_head_dim == 48
  assert cfg.softmax_scale == pytest.approx(48 ** -0.5)
  assert ModelConfig(attention="mqa").kv_heads == 1
  assert ModelConfig(attention="mha", num_heads=6).kv_heads == 6


def test_yarn_softmax_scale_uses_mscale_all_dim_squared():
  cfg = load_config(CONFIGS[0].parent / "deepseek_v2.yaml").model
  mscale = 0.1 * 0.707 * jnp.log(40.0) + 1.0  # 1.2608...
  assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * float(mscale) ** 2, rel=1e-6)
  # mscale == mscale_all_dim: the cos/sin factor cancels to exactly 1, as in DeepSeek-V2/V3.
  assert cfg.rope_scaling.attention_factor() == 1.0
  assert yarn_get_mscale(1.0, 5.0) == 1.0  # no extension, no correction


def test_rope_scaling_mapping_becomes_hashable_dataclass():
  cfg = ModelConfig(rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 64})
  assert isinstance(cfg.rope_scaling, YarnScaling)
  assert cfg.rope_scaling.factor == 4.0 and cfg.rope_scaling.beta_fast == 32.0
  hash(cfg)  # configs are module attributes and jit static values


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_builds_its_model(path):
  cfg = load_config(path).model
  model = mla_jax.Transformer(cfg)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  params = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)
  logits, _ = jax.eval_shape(lambda p, t: model.apply(p, t), params, tokens)
  assert logits.shape == (1, 8, cfg.vocab_size) and logits.dtype == jnp.float32
  assert {"embed_tokens", "lm_head", "norm", f"layers_{cfg.num_layers - 1}"} <= set(params["params"])


def test_overrides_parse_yaml_values(tmp_path):
  cfg = load_config(CONFIGS[0].parent / "tiny.yaml", "model.kv_lora_rank=64", "model.q_lora_rank=null",
                    "model.dtype=bfloat16", "model.rope_scaling.factor=4",
                    "model.rope_scaling.original_max_position_embeddings=128")
  assert cfg.model.kv_lora_rank == 64 and cfg.model.q_lora_rank is None
  assert cfg.model.dtype == "bfloat16"
  assert cfg.model.rope_scaling == YarnScaling(factor=4.0, original_max_position_embeddings=128)


@pytest.mark.parametrize("override, message", [
    ("model.kv_lora_rnk=3", "model.kv_lora_rnk"),
    ("modl.kv_lora_rank=3", "modl.kv_lora_rank"),
    ("model.kv_lora_rank=3.5", "model.kv_lora_rank"),
    ("model.hidden_size=abc", "model.hidden_size"),
    ("model.kv_lora_rank.x=3", "model.kv_lora_rank.x"),
    ("model.rope_interleave=1", "model.rope_interleave"),
    ("model.kv_lora_rank", "expected key=value"),
])
def test_bad_overrides_name_the_key(override, message):
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    load_config(CONFIGS[0].parent / "tiny.yaml", override)


def test_unknown_yaml_key_and_missing_file(tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_text("model:\n  hidden_size: 64\n  num_experts: 3\n")
  with pytest.raises(ValueError, match=r"model\.num_experts"):
    load_config(bad)
  bad.write_text("optimizer:\n  lr: 1\n")
  with pytest.raises(ValueError, match="'optimizer'"):
    load_config(bad)
  with pytest.raises(ValueError, match="does not exist"):
    load_config(tmp_path / "nope.yaml")


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}

# (field that must be named, changes): each is one invalid configuration.
INVALID = [
    ("model.vocab_size", dict(vocab_size=0)),
    ("model.hidden_size", dict(hidden_size=-8)),
    ("model.num_layers", dict(num_layers=0)),
    ("model.num_heads", dict(num_heads=0)),
    ("model.q_lora_rank", dict(q_lora_rank=0)),
    ("model.kv_lora_rank", dict(kv_lora_rank=-1)),
    ("model.qk_nope_head_dim", dict(qk_nope_head_dim=0)),
    ("model.qk_rope_head_dim", dict(qk_rope_head_dim=7)),
    ("model.qk_rope_head_dim", dict(qk_rope_head_dim=0)),
    ("model.v_head_dim", dict(v_head_dim=0)),
    ("model.intermediate_size", dict(intermediate_size=0)),
    ("model.rope_theta", dict(rope_theta=0.0)),
    ("model.rms_norm_eps", dict(rms_norm_eps=0.0)),
    ("model.max_seq_len", dict(max_seq_len=0)),
    ("model.dtype", dict(dtype="float64")),
    ("model.param_dtype", dict(param_dtype="int8")),
    ("model.attention", dict(attention="sparse")),
    ("model.num_kv_heads", dict(attention="mla", num_kv_heads=2)),
    ("model.num_kv_heads", dict(attention="mha", num_heads=4, num_kv_heads=2)),
    ("model.num_kv_heads", dict(attention="mqa", num_kv_heads=2)),
    ("model.num_kv_heads", dict(attention="gqa", num_heads=4, num_kv_heads=3)),
    ("model.num_kv_heads", dict(attention="gqa", num_heads=4, num_kv_heads=None)),
    ("model.rope_interleave", dict(rope_interleave="yes")),
    ("model.num_heads", dict(num_heads=True)),
    ("model.hidden_size", dict(hidden_size=64.5)),
    ("model.rope_scaling", dict(rope_scaling=[4.0])),
    ("model.rope_scaling.type", dict(rope_scaling={**YARN, "type": "linear"})),
    ("model.rope_scaling.factor", dict(rope_scaling={**YARN, "factor": 0.5})),
    ("model.rope_scaling.original_max_position_embeddings",
     dict(rope_scaling={"type": "yarn", "factor": 4.0})),
    ("model.rope_scaling.beta_fast", dict(rope_scaling={**YARN, "beta_fast": 0.5})),
    ("model.rope_scaling.mscale_all_dim", dict(rope_scaling={**YARN, "mscale_all_dim": -1})),
    ("model.rope_scaling.alpha", dict(rope_scaling={**YARN, "alpha": 1})),
    ("model.decode_kernel", dict(decode_kernel="triton")),
    ("model.decode_kernel", dict(decode_kernel="pallas", attention="mha")),
    ("model.decode_kernel_block_size", dict(decode_kernel_block_size=12)),
    ("model.decode_kernel_block_size", dict(decode_kernel_block_size=0)),
    ("model.decode_kv_splits", dict(decode_kv_splits=0)),
]


@pytest.mark.parametrize("field, changes", INVALID, ids=[f"{f}:{c}" for f, c in INVALID])
def test_invalid_config_raises_naming_the_field(field, changes):
  with pytest.raises(ValueError) as err:
    ModelConfig(**changes)
  message = str(err.value)
  assert message.startswith(field + "="), message  # the field, then its value, then what is allowed
  assert "invalid" in message


def test_configs_are_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    ModelConfig().hidden_size = 3


def test_tiny_yaml_spells_out_the_built_in_defaults():
  """`mla-jax train` with no arguments uses Config(); configs/tiny.yaml must say the same."""
  tiny = load_config(CONFIGS[0].parent / "tiny.yaml")
  assert tiny == load_config(None)
  assert dataclasses.replace(tiny, workdir=None) == mla_jax.Config()
  assert tiny.workdir == f"runs/tiny-{mla_jax.Config().run_id()}"


@pytest.mark.parametrize("override, message", [
    ("train.steps=0", "train.steps=0"),
    ("train.warmup_steps=1000", r"train.warmup_steps=1000 .*\[0, steps=1000\)"),
    ("train.warmup_steps=100 train.steps=50", r"train.warmup_steps=100 .*\[0, steps=50\)"),
    ("train.seq_len=512", r"train.seq_len=512 .*model.max_seq_len \(256\)"),
    ("train.batch_size=two", "train.batch_size='two'"),
    ("train.beta2=1.0", "train.beta2=1.0"),
    ("train.min_learning_rate=1.0", "train.min_learning_rate=1.0"),
    ("data.val_fraction=0", "data.val_fraction=0"),
    ("data.path=''", "data.path=''"),
    ("seed=1.5", "seed=1.5"),
    ("workdir.x=1", "workdir.x"),
    ("training.steps=3", "training.steps"),
])
def test_train_and_data_sections_validate(override, message):
  with pytest.raises(ValueError, match=message.replace(".", r"\.").replace(r"\.*", ".*")):
    load_config(None, *override.split())


@pytest.mark.parametrize("override", ["train.sample_temperature=.nan", "train.learning_rate=.nan",
                                      "train.grad_clip=.inf", "model.rope_theta=.inf",
                                      "data.val_fraction=.nan", "model.rms_norm_eps=-.inf"])
def test_non_finite_floats_are_refused(override):
  """NaN passes every `<` range check and inf most of them: refused by kind, for every float."""
  key, value = override.split("=")
  shown = {".nan": "nan", ".inf": "inf", "-.inf": "-inf"}[value]
  with pytest.raises(ValueError, match=rf"^{re.escape(key)}={shown} is invalid: expected a finite "
                                       r"number$"):
    load_config(None, override)


def test_top_level_overrides():
  cfg = load_config(None, "workdir=runs/x", "seed=7", "train.steps=20", "train.warmup_steps=2",
                    "data.path=/tmp/t.txt")
  assert (cfg.workdir, cfg.seed, cfg.train.steps, cfg.data.path) == ("runs/x", 7, 20, "/tmp/t.txt")


# Issue 9, item 2: the default warmup composes with short runs; an explicit bad value is refused.
@pytest.mark.parametrize("steps, warmup", [(1, 0), (9, 0), (50, 5), (100, 10), (1000, 100),
                                           (20000, 100)])
def test_default_warmup_is_min_100_or_a_tenth_of_the_steps(steps, warmup):
  config = load_config(None, f"train.steps={steps}")
  assert config.train.warmup_steps is None and config.train.warmup == warmup
  assert load_config(None, f"train.steps={steps}", "train.warmup_steps=0").train.warmup == 0


def test_short_run_learning_rate_schedule_warms_up_then_decays():
  from mla_jax.train import make_optimizer

  _, schedule = make_optimizer(load_config(None, "train.steps=50").train)
  assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(3e-3)
  assert float(schedule(50)) == pytest.approx(3e-4)


# Issue 9, item 3: numbers in every common notation are numbers, on the command line and in YAML.
@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("3e-4", 3e-4), ("1E-3", 1e-3),
                                         ("1.0e-3", 1e-3), ("0.001", 1e-3), (".5", 0.5),
                                         ("+2e-2", 2e-2), ("1e0", 1.0), ("3", 3.0)])
def test_scientific_notation_is_a_number(tmp_path, text, value):
  assert load_config(None, f"train.learning_rate={text}").train.learning_rate == value
  path = tmp_path / "lr.yaml"
  path.write_text(f"train:\n  learning_rate: {text}\n  min_learning_rate: 0\n")
  assert load_config(path).train.learning_rate == value


def test_integers_stay_integers_and_strings_stay_strings():
  config = load_config(None, "train.steps=1_000", "train.sample_prompt=1e3x", "seed=7")
  assert config.train.steps == 1000 and config.train.sample_prompt == "1e3x" and config.seed == 7
  with pytest.raises(ValueError, match=r"train\.steps=1000\.5 is invalid: expected an integer"):
    load_config(None, "train.steps=1.0005e3")  # integral values in any notation are integers


# Issue 9, item 1: the default workdir is the config's name and a hash of what defines the run.
def test_default_workdir_separates_unrelated_runs_and_keeps_the_same_run():
  base = load_config(None)
  assert base.workdir.startswith("runs/tiny-") and len(base.workdir) == len("runs/tiny-") + 8
  for override in ("data.path=/tmp/corpus", "train.steps=200", "train.learning_rate=1e-3",
                   "model.kv_lora_rank=16", "seed=1"):
    assert load_config(None, override).workdir != base.workdir, override
  for override in ("train.log_every=1", "train.sample_tokens=0", "mesh.data=1",
                   "train.keep_checkpoints=9", "train.warmup_steps=100"):  # 100 = the default's
    assert load_config(None, override).workdir == base.workdir, override
  assert load_config(None, "workdir=runs/mine").workdir == "runs/mine"
  assert load_config("tiny_mqa").workdir.startswith("runs/tiny_mqa-")


# Issue 9, item 9: presets ship with the package and are named from any directory.
def test_presets_resolve_by_name_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  v2 = load_config("deepseek_v2")
  assert v2.model.kv_lora_rank == 512 and v2.workdir.startswith("runs/deepseek_v2-")
  assert load_config("configs/tiny.yaml") == load_config("tiny.yaml") == load_config("tiny")
  assert set(presets()) >= {"tiny", "small", "deepseek_v2", "deepseek_v2_lite", "deepseek_v3"}
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "tiny.yaml").write_text("model:\n  hidden_size: 64\n")
  assert load_config("configs/tiny.yaml").model.hidden_size == 64  # a real path wins


# Issue 9, item 10: unknown keys and names suggest the close valid ones; a directory is named.
@pytest.mark.parametrize("items, message", [
    (["train.stepz=3"], "unknown config key 'train.stepz' (did you mean 'train.steps'"),
    (["modl.kv_lora_rank=3"], "did you mean 'model.kv_lora_rank'"),
    (["model.kv_lora_rnk=3"], "did you mean 'model.kv_lora_rank'"),
    (["model.hidden_size", "64"], "did you mean model.hidden_size=64?"),
    (["tiny", "model.hidden_size", "64"], "did you mean model.hidden_size=64?"),
    (["deepseek_v4"], "no preset is called 'deepseek_v4' (did you mean 'deepseek_v3'"),
    (["configs"], "config 'configs' is a directory; expected a YAML file"),
])
def test_command_line_mistakes_get_a_suggestion(items, message, monkeypatch):
  monkeypatch.chdir(CONFIGS[0].parents[1])
  with pytest.raises(ValueError) as err:
    load_config_args(items)
  assert message in str(err.value)


def test_yaml_file_unknown_key_suggests(tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_text("train:\n  learning_rat: 0.1\n")
  with pytest.raises(ValueError, match=r"did you mean 'train\.learning_rate'"):
    load_config(bad)


@pytest.mark.parametrize("text", ["1e3", "1E3", "1.0e3", "1000"])
def test_integer_fields_accept_scientific_notation(text):
  """`train.steps=1e3` is 1000 (an int), as in YAML `steps: 1e3`; 1.5e0 is still refused."""
  steps = mla_jax.load_config(None, f"train.steps={text}").train.steps
  assert steps == 1000 and type(steps) is int
  with pytest.raises(ValueError, match=r"train.steps=1.5 is invalid: expected an integer"):
    mla_jax.load_config(None, "train.steps=1.5e0")


def test_the_small_preset_can_be_shortened_with_one_override():
  """Its warmup follows the default rule, so train.steps alone shortens it (issue 9, item 2)."""
  config = mla_jax.load_config("small", "train.steps=50")
  assert config.train.warmup == 5


@pytest.mark.parametrize("field, given, name", [
    ("dtype", jnp.bfloat16, "bfloat16"), ("dtype", jnp.dtype("float16"), "float16"),
    ("param_dtype", jnp.float32, "float32"), ("cache_dtype", jnp.int8, "int8"),
    ("cache_dtype", jnp.bfloat16, "bfloat16"),
])
def test_dtype_objects_are_normalised_to_their_names(tmp_path, field, given, name):
  """ModelConfig(dtype=jnp.bfloat16) was refused with 'expected a string' (load_hf takes one);
  the name is stored, so the config still serialises to a workdir's YAML and to JSON."""
  import json

  from mla_jax.workdir import read_workdir_config, write_config

  model = ModelConfig(**{field: given})
  assert getattr(model, field) == name and type(getattr(model, field)) is str
  assert model == ModelConfig(**{field: name})
  config = mla_jax.Config(model=model, workdir=str(tmp_path))
  write_config(tmp_path, config)
  assert read_workdir_config(tmp_path) == config
  assert json.loads(json.dumps(config.to_dict()))["model"][field] == name


def test_dtype_objects_outside_the_allowed_list_are_still_named():
  with pytest.raises(ValueError, match=r"^model\.dtype='int8' is invalid: allowed: float32, "
                                       r"bfloat16, float16$"):
    ModelConfig(dtype=jnp.int8)
  with pytest.raises(ValueError, match=r"^model\.param_dtype='float64' is invalid: allowed: "):
    ModelConfig(param_dtype=float)
