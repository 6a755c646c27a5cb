import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import mla_jax
from mla_jax.config import ModelConfig, YarnScaling, load_config, yarn_get_mscale

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
    ("model.hidden_size", dict(hidden_size=64.0)),
    ("model.rope_scaling", dict(rope_scaling=[4.0])),
    ("model.rope_scaling.type", dict(rope_scaling={**YARN, "type": "linear"})),
    ("model.rope_scaling.factor", dict(rope_scaling={**YARN, "factor": 0.5})),
    ("model.rope_scaling.original_max_position_embeddings",
     dict(rope_scaling={"type": "yarn", "factor": 4.0})),
    ("model.rope_scaling.beta_fast", dict(rope_scaling={**YARN, "beta_fast": 0.5})),
    ("model.rope_scaling.mscale_all_dim", dict(rope_scaling={**YARN, "mscale_all_dim": -1})),
    ("model.rope_scaling.alpha", dict(rope_scaling={**YARN, "alpha": 1})),
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
  assert load_config(CONFIGS[0].parent / "tiny.yaml") == mla_jax.Config()
  assert load_config(None) == mla_jax.Config()


@pytest.mark.parametrize("override, message", [
    ("train.steps=0", "train.steps=0"),
    ("train.warmup_steps=1000", r"train.warmup_steps=1000 .*\[0, steps=1000\)"),
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
    load_config(None, override)


def test_top_level_overrides():
  cfg = load_config(None, "workdir=runs/x", "seed=7", "train.steps=20", "train.warmup_steps=2",
                    "data.path=/tmp/t.txt")
  assert (cfg.workdir, cfg.seed, cfg.train.steps, cfg.data.path) == ("runs/x", 7, 20, "/tmp/t.txt")
