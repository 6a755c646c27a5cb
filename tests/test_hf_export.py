"""Export to Hugging Face DeepseekV2/V3 (mla_jax/hf/export.py): mla-jax -> HF -> mla-jax gives the
same arrays bit for bit; transformers (PyTorch, CPU) loads every export with no missing or
unused tensor and computes the same logits and greedy tokens; models trained by `mla-jax train`
export through the command and generate the same text in transformers, with the byte tokenizer
written as tokenizer.json; what no DeepSeek config expresses is refused on one line."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mla_jax
from mla_jax.config import ModelConfig
from mla_jax.hf import load_hf, read_safetensors, save_hf
from mla_jax.tokenizers import ByteTokenizer, byte_tokenizer_json
from tests.helpers import DATA, SMALL_MODEL
from tests.hf_parity import PARITY_INSTALL, assert_same_greedy_tokens

torch = pytest.importorskip("torch", reason=f"Hugging Face parity tests need PyTorch: {PARITY_INSTALL}")
transformers = pytest.importorskip(
    "transformers", reason=f"Hugging Face parity tests need transformers: {PARITY_INSTALL}")

BASE = dict(vocab_size=97, hidden_size=64, num_layers=3, num_heads=4, q_lora_rank=None,
            kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
            intermediate_size=96, max_seq_len=128)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0,
        "mscale_all_dim": 0.5}
V3_MOE = dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
              scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
              norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1)
CASES = {
    # family, config: every option the tensor map has a branch for
    "v3_dense_half_rotation": ("DeepseekV3", dict(rope_interleave=False)),
    "v3_moe_q_lora_yarn_mtp": ("DeepseekV3", dict(q_lora_rank=32, rope_scaling=YARN,
                                                  num_mtp_layers=1, **V3_MOE)),
    "v3_moe_scan_layers": ("DeepseekV3", dict(scan_layers=True, **V3_MOE)),
    "v2_moe_group_limited": ("DeepseekV2", dict(
        q_lora_rank=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
        topk_method="group_limited_greedy", n_group=4, topk_group=2)),
    # V2 rotates interleaved pairs only: a half-rotation model is permuted on the way out.
    # (transformers' DeepseekV2 ignores norm_topk_prob, which DeepSeek's code and vLLM honour:
    # the V2 cases leave it off.)
    "v2_moe_half_rotation": ("DeepseekV2", dict(
        n_routed_experts=4, num_experts_per_tok=2, rope_interleave=False,
        routed_scaling_factor=1.5)),
}


def _model(name, dtype="float32"):
  """A random model whose weights are large enough (and norms far enough from 1) that a
  misplaced tensor shows in the logits."""
  config = ModelConfig(**{**BASE, **CASES[name][1]}, dtype=dtype, param_dtype=dtype)
  model = mla_jax.Transformer(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  keys = iter(jax.random.split(jax.random.key(1), 1000))
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (1 + 0.2 * jax.random.normal(next(keys), x.shape) if "scale" in str(path)
                       else 7.5 * x + 0.3 * jax.random.normal(next(keys), x.shape) * (
                           "e_score_correction_bias" in str(path))).astype(x.dtype), params)
  return model, params


def _hf(directory):
  """transformers' model of an exported directory. Nothing may be missing or mismatched, and
  nothing unexpected but the MTP layers (model.layers.{num_hidden_layers + k}.*), which
  transformers' DeepseekV3 does not build (it names only DeepSeek-V3's own layer 61 as one to
  ignore)."""
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      directory, attn_implementation="eager", output_loading_info=True)
  hf = json.loads((directory / "config.json").read_text())
  mtp = tuple(f"model.layers.{hf['num_hidden_layers'] + k}."
              for k in range(hf["num_nextn_predict_layers"]))
  unexpected = [k for k in info.pop("unexpected_keys") if not k.startswith(mtp)]
  assert not unexpected and not any(info.values()), (unexpected, info)
  if mtp:  # the MTP layer is there, with its copies of the embedding and the head
    names = set(json.loads((directory / "model.safetensors.index.json").read_text())
                ["weight_map"])
    assert {mtp[0] + n for n in ("enorm.weight", "hnorm.weight", "eh_proj.weight",
                                 "embed_tokens.weight", "shared_head.head.weight",
                                 "shared_head.norm.weight")} <= names
  return model.eval()


# Two cases run by default (V3 with MoE, q-LoRA, YaRN and an MTP module; V2 with the RoPE permutation), the
# others with -m slow: each case builds, exports and runs a model in transformers.
DEFAULT_CASES = {"v3_moe_q_lora_yarn_mtp", "v2_moe_half_rotation"}


@pytest.fixture(scope="module", params=[
    name if name in DEFAULT_CASES else pytest.param(name, marks=pytest.mark.slow)
    for name in sorted(CASES)])
def exported(request, tmp_path_factory):
  model, params = _model(request.param)
  directory = tmp_path_factory.mktemp(request.param) / "hf"
  save_hf(model, params, directory, max_shard_size="30KB", eos_token_id=3)
  return request.param, model, params, directory


def test_round_trip_gives_the_same_arrays(exported):
  name, model, params, directory = exported
  loaded_model, loaded = load_hf(directory)
  config = loaded_model.config
  assert config.scan_layers is False and config.qk_rope_groups == 1
  if model.config.scan_layers:
    params = mla_jax.model.unstack_layers(model.config, params)
  leaves = lambda tree: dict(jax.tree_util.tree_leaves_with_path(tree))  # noqa: E731
  if name == "v2_moe_half_rotation":  # permuted into V2's layout: equal after permuting back
    assert config.rope_interleave is True
    perm = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])  # interleaved -> half
    for layer in range(3):
      attn = loaded[f"layers_{layer}"]["self_attn"]
      attn["q_proj"] = attn["q_proj"].at[..., 16:].set(attn["q_proj"][..., 16:][..., perm])
      attn["kv_a_proj_with_mqa"] = attn["kv_a_proj_with_mqa"].at[:, 24:].set(
          attn["kv_a_proj_with_mqa"][:, 24:][:, perm])
  else:
    assert config == model.config.__class__(**{**model.config.to_dict(), "scan_layers": False})
  assert leaves(loaded).keys() == leaves(params).keys()
  for path, array in leaves(params).items():
    assert np.asarray(loaded_leaf := leaves(loaded)[path]).dtype == np.asarray(array).dtype
    np.testing.assert_array_equal(np.asarray(loaded_leaf), np.asarray(array), err_msg=str(path))


def test_transformers_computes_the_same_logits_and_greedy_tokens(exported):
  name, model, params, directory = exported
  hf_model = _hf(directory)
  assert type(hf_model).__name__ == f"{CASES[name][0]}ForCausalLM"
  tokens = np.random.default_rng(0).integers(0, 97, (2, 40))
  with torch.no_grad():
    expected = hf_model(torch.as_tensor(tokens)).logits.numpy()
  logits, _ = model.apply({"params": params}, jnp.asarray(tokens))
  assert np.abs(np.asarray(logits) - expected).max() <= 1e-4
  assert_same_greedy_tokens(hf_model, model, params, tokens[:, :8], 30)  # past the export's EOS


def test_shards_are_bounded_by_size_and_indexed(exported):
  _, _, _, directory = exported
  index = json.loads((directory / "model.safetensors.index.json").read_text())
  files = sorted({f for f in index["weight_map"].values()})
  assert files == sorted(p.name for p in directory.glob("*.safetensors")) and len(files) > 3
  total = 0
  for file in files:
    tensors = read_safetensors(directory / file)
    assert {n for n, f in index["weight_map"].items() if f == file} == set(tensors)
    size = sum(t.nbytes for t in tensors.values())
    assert size <= 30_000 or len(tensors) == 1  # a larger tensor gets a file of its own
    total += size
  assert index["metadata"]["total_size"] == total
  assert json.loads((directory / "generation_config.json").read_text())["eos_token_id"] == 3


@pytest.mark.slow
def test_bfloat16_weights_export_as_bfloat16(tmp_path):
  model, params = _model("v3_moe_q_lora_yarn_mtp", dtype="bfloat16")
  directory = save_hf(model, params, tmp_path / "bf16")
  tensors = read_safetensors(directory / "model.safetensors")  # one file under 5GB: no index
  assert not (directory / "model.safetensors.index.json").exists()
  kinds = {n: t.dtype.name for n, t in tensors.items()}
  assert kinds["model.embed_tokens.weight"] == "bfloat16"
  assert kinds["model.layers.1.mlp.gate.weight"] == "float32"  # the router, as DeepSeek keeps it
  _, loaded = load_hf(directory, dtype="bfloat16")
  np.testing.assert_array_equal(np.asarray(loaded["layers_0"]["self_attn"]["q_b_proj"]),
                                np.asarray(params["layers_0"]["self_attn"]["q_b_proj"]))


@pytest.mark.slow
def test_what_no_deepseek_config_expresses_is_refused(tmp_path):
  cases = [
      (dict(attention="gqa", num_kv_heads=2), r"^model\.attention=gqa: a DeepSeek checkpoint "
       r"holds MLA attention only, and the MHA, GQA and MQA baselines \(Llama, Qwen2, Mistral "
       r"models\) have no DeepSeek config; convert the model to MLA first with `mla-jax "
       r"convert-to-mla`$"),
      (dict(qk_rope_head_dim=16, qk_rope_groups=2), r"^model\.qk_rope_groups=2: DeepSeek's MLA "
       r"has one shared RoPE key"),
      (dict(latent_norm_eps=1e-5), r"^model\.latent_norm_eps=1e-05: DeepSeek's latent norms"),
  ]
  for changes, message in cases:
    config = ModelConfig(**{**BASE, **changes})
    params = mla_jax.Transformer(config).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(ValueError, match=message):
      save_hf(config, params["params"], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
  model, params = _model("v3_dense_half_rotation")
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "x").write_text("")
  with pytest.raises(ValueError, match=r"already exists and is not an empty directory"):
    save_hf(model, params, tmp_path / "taken")
  with pytest.raises(ValueError, match=r"--max-shard-size '5 apples' is invalid"):
    save_hf(model, params, tmp_path / "new", max_shard_size="5 apples")
  with pytest.raises(ValueError, match=r"params lack layers_0/self_attn/q_a_proj"):
    save_hf(ModelConfig(**{**BASE, "q_lora_rank": 32}), params, tmp_path / "new")
  extra = {**params, "layers_0": {**params["layers_0"], "extra": jnp.ones(3)}}
  with pytest.raises(ValueError, match=r"params hold \['layers_0/extra'\], which no Hugging Face "
                                       r"tensor of this config holds"):
    save_hf(model, extra, tmp_path / "new")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing half-written


def test_byte_tokenizer_json_encodes_and_decodes_as_the_byte_tokenizer():
  from tokenizers import Tokenizer

  hf = Tokenizer.from_str(byte_tokenizer_json())
  ours = ByteTokenizer()
  for text in ["def f(x):\n\treturn x  # é €😀", " two  spaces\r\n", "", "\x00\x7f"]:
    assert hf.encode(text).ids == ours.encode(text)
    assert hf.decode(ours.encode(text)) == text
  ids = ours.encode("ab") + [ByteTokenizer.EOS, ByteTokenizer.PAD, ByteTokenizer.BOS]
  assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids) == "ab"
  assert hf.decode([0xC3]) == ours.decode([0xC3]) == "\ufffd"  # half a character


TRAINED = {  # mla-jax train runs of a few seconds: dense MLA with an MTP module, and MLA +
           # DeepSeekMoE (V2 routing)
    "dense_mtp": ["model.num_mtp_layers=1"],
    "moe": ["model.n_routed_experts=4", "model.num_experts_per_tok=2",
            "model.n_shared_experts=1", "model.moe_intermediate_size=16",
            "model.first_k_dense_replace=1"],
}


def _run(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "mla_jax.cli", *args], capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture(scope="module", params=[  # the MoE run with -m slow: the cases above export MoE
    pytest.param(name, marks=pytest.mark.slow) if name == "moe" else name
    for name in sorted(TRAINED)])
def trained_export(request, tmp_path_factory):
  root = tmp_path_factory.mktemp(f"trained_{request.param}")
  train = _run("train", f"workdir={root / 'run'}", f"data.path={DATA}", *SMALL_MODEL,
               *TRAINED[request.param], "train.steps=40", "train.batch_size=8", "train.seq_len=32",
               "train.eval_every=40", "train.eval_batches=1", "train.sample_tokens=0")
  assert train.returncode == 0, train.stderr
  export = _run("export", str(root / "run"), str(root / "hf"), "--max-shard-size", "20KB")
  assert export.returncode == 0, export.stderr
  assert export.stdout.strip() == (f"wrote {root / 'hf'}: transformers' AutoModelForCausalLM."
                                   f"from_pretrained({str(root / 'hf')!r}) loads it")
  return request.param, root / "run", root / "hf"


def test_trained_model_loads_in_transformers_with_the_same_logits_and_text(trained_export):
  name, workdir, directory = trained_export
  run = mla_jax.load_run(workdir)
  hf_model = _hf(directory)
  assert type(hf_model).__name__ == ("DeepseekV2ForCausalLM" if name == "moe"
                                     else "DeepseekV3ForCausalLM")
  assert run.model.config.num_mtp_layers == (name == "dense_mtp")
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  prompt = "def main(argv):\n    "
  ids = tokenizer(prompt)["input_ids"]
  assert ids == run.tokenizer.encode(prompt)
  tokens = np.asarray([ids + ids[::-1]])
  with torch.no_grad():
    expected = hf_model(torch.as_tensor(tokens)).logits.numpy()
  logits, _ = run.model.apply({"params": run.params}, jnp.asarray(tokens))
  assert np.abs(np.asarray(logits) - expected).max() <= 1e-4
  with torch.no_grad():
    hf_out = hf_model.generate(torch.as_tensor([ids]), max_new_tokens=40, do_sample=False)[0]
  ours = mla_jax.generate(run.model, run.params, [ids], max_new_tokens=40, eos_id=run.eos_id)[0]
  assert tokenizer.decode(hf_out, skip_special_tokens=True) == run.tokenizer.decode(ours)
  assert hf_out.tolist() == ours[:len(hf_out)].tolist()


def test_the_command_refuses_a_baseline_on_one_line(tmp_path):
  """Refused from config.yaml alone, before any checkpoint is read."""
  from mla_jax.config import load_config
  from mla_jax.workdir import write_config

  (tmp_path / "gqa").mkdir()
  write_config(tmp_path / "gqa", load_config(None, "model.attention=mqa"))
  result = _run("export", str(tmp_path / "gqa"), str(tmp_path / "hf"))
  assert result.returncode == 2 and not (tmp_path / "hf").exists()
  assert result.stderr.splitlines() == [
      "mla-jax: error: model.attention=mqa: a DeepSeek checkpoint holds MLA attention only, and "
      "the MHA, GQA and MQA baselines (Llama, Qwen2, Mistral models) have no DeepSeek config; "
      "convert the model to MLA first with `mla-jax convert-to-mla`"]
