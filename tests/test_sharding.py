"""Sharded training and decoding on 8 fake CPU devices: equal to one device, and laid out as the
rules table says."""

import dataclasses
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import mla_jax
from mla_jax.checkpoint import Checkpoints
from mla_jax.config import load_config
from mla_jax.train.data import batch_at
from mla_jax.train.metrics import read_metrics
from mla_jax.sharding import (CACHE_AXES, PARAM_AXES, RULES, make_mesh, mesh_shape, shard,
                              sharded_cached_apply, tree_shardings)
from mla_jax.train import Trainer
from tests.helpers import DATA, SMALL_MODEL, TINY_CONFIGS, rel_err

MODEL = [o for o in SMALL_MODEL if "num_heads" not in o] + ["model.num_heads=4"]
TRAIN = ["train.batch_size=8", "train.seq_len=32", "train.warmup_steps=1", "train.steps=10"]


def _trainer(*mesh, devices=None):
  config = load_config(None, *MODEL, *TRAIN, "mesh.data=1", *mesh)
  return Trainer.build(config, devices=devices)


def _batches(n):
  tokens = (np.arange(20_000) * 7919 % 251).astype(np.uint16)
  return [batch_at(tokens, 0, 0, i, 8, 32) for i in range(n)]


@pytest.fixture(scope="module")
def reference():
  """Two training steps on one device."""
  trainer = _trainer(devices=jax.devices()[:1])
  initial = trainer.init_state()
  state, losses = jax.tree_util.tree_map(jnp.copy, initial), []
  for inputs, targets in _batches(2):
    state, metrics = trainer.train_step(state, *trainer.put_batch(inputs, targets))
    losses.append(float(metrics["loss"]))
  return initial, state, losses


MESHES = {
    "data8": ["mesh.data=8"],
    "fsdp8": ["mesh.fsdp=8"],
    "data2_tensor4": ["mesh.data=2", "mesh.tensor=4"],
    "data2_fsdp2_tensor2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
}


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_training_step_equals_one_device(reference, name):
  initial, expected, expected_losses = reference
  trainer = _trainer(*MESHES[name])
  state = jax.device_put(jax.device_get(initial), trainer.state_shardings)  # fresh buffers
  losses = []
  for inputs, targets in _batches(2):
    state, metrics = trainer.train_step(state, *trainer.put_batch(inputs, targets))
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
  for got, want in zip(jax.tree_util.tree_leaves(state.params),
                       jax.tree_util.tree_leaves(expected.params)):
    assert rel_err(got, want) <= 1e-5

  # Layout: what the rules table says, on the parameters and on AdamW's moments alike.
  mesh = trainer.mesh
  params = state.params
  adam = state.opt_state.inner_state[1][0]  # apply_if_finite > chain(clip, adamw) > scale_by_adam
  for tree in (params, adam.mu, adam.nu):
    assert tree["embed_tokens"].sharding.spec == P("tensor", "fsdp")
    assert tree["lm_head"].sharding.spec == P("fsdp", "tensor")
    attn, mlp = tree["layers_1"]["self_attn"], tree["layers_1"]["mlp"]
    assert attn["kv_b_proj"].sharding.spec == P(None, "tensor", None)
    assert attn["kv_a_proj_with_mqa"].sharding.spec == P("fsdp", None)
    assert attn["o_proj"].sharding.spec == P("tensor", None, "fsdp")
    assert mlp["down_proj"].sharding.spec == P("tensor", "fsdp")
    assert tree["norm"]["scale"].sharding.spec == P(None)
  expected_shardings = tree_shardings(params, mesh)
  jax.tree_util.tree_map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim) or pytest.fail(str(a)),
                         params, expected_shardings)
  # Each device holds its share: e.g. embed_tokens [260, 32] split (tensor, fsdp) ways.
  shard_shape = params["embed_tokens"].addressable_shards[0].data.shape
  assert shard_shape == (260 // mesh.shape["tensor"], 32 // mesh.shape["fsdp"])


def test_every_parameter_has_logical_axes_and_rules_cover_them():
  for path in sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml")):
    model = mla_jax.Transformer(load_config(path).model)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    tree_shardings(params["params"], make_mesh({"data": 8, "fsdp": 1, "tensor": 1,
                                                "sequence": 1}))
  used = {a for axes in list(PARAM_AXES.values()) + list(CACHE_AXES.values()) for a in axes}
  assert used - {None} <= set(RULES)


@pytest.mark.parametrize("sizes, message", [
    ({"data": 3, "fsdp": 1, "tensor": 1, "sequence": 1}, "has 3 devices, but 8 are available"),
    ({"data": -1, "fsdp": 3, "tensor": 1, "sequence": 1}, r"mesh\.data=-1 cannot be resolved"),
    ({"data": -1, "fsdp": -1, "tensor": 1, "sequence": 1}, "at most one axis"),
])
def test_mesh_sizes_are_checked(sizes, message):
  with pytest.raises(ValueError, match=message):
    mesh_shape(sizes, 8)


ALLOWED_SIZES = ("must be a positive device count, or -1 for the remaining devices (one axis "
                 "at most)")


@pytest.mark.parametrize("sizes, message", [
    ({"dta": 2, "fsdp": 1, "tensor": 1, "sequence": 4},
     "mesh axis 'dta' is unknown (did you mean 'data'?): allowed data, fsdp, tensor, sequence"),
    ({"data": 8, "model": 1, "tensor": 1, "sequence": 1},
     "mesh axis 'model' is unknown: allowed data, fsdp, tensor, sequence"),
    ({"data": 8}, "mesh sizes have no fsdp, tensor, sequence: give all of data, fsdp, tensor, "
                  "sequence (1 for an axis not split)"),
    ({"data": 8, "fsdp": 0, "tensor": 1, "sequence": 1}, f"mesh.fsdp=0 is invalid: {ALLOWED_SIZES}"),
    ({"data": -2, "fsdp": 1, "tensor": 1, "sequence": 1},
     f"mesh.data=-2 is invalid: {ALLOWED_SIZES}"),
    ({"data": -8, "fsdp": -1, "tensor": 1, "sequence": 1},
     f"mesh.data=-8 is invalid: {ALLOWED_SIZES}"),
    ({"data": 8.0, "fsdp": 1, "tensor": 1, "sequence": 1},
     f"mesh.data=8.0 is invalid: {ALLOWED_SIZES}"),
    ({"data": 8, "fsdp": True, "tensor": 1, "sequence": 1},
     f"mesh.fsdp=True is invalid: {ALLOWED_SIZES}"),
    ([8, 1, 1, 1], "mesh sizes must be a dict of data, fsdp, tensor, sequence to device counts, "
                   "got list [8, 1, 1, 1]"),
])
def test_mesh_axes_and_sizes_are_named(sizes, message):
  """A misspelled axis used to raise KeyError('data') from make_mesh, and negative sizes (-2 and
  -8 on 8 devices) a product message about a mesh no one asked for."""
  with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
    mesh_shape(sizes, 8)
  with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
    make_mesh(sizes)


def test_indivisible_dimensions_name_the_mesh_axis():
  with pytest.raises(ValueError, match=r"mesh\.tensor=8 does not divide dimension 0 \('vocab', "
                                       r"size 260\) of \.params\['embed_tokens'\]"):
    _trainer("mesh.tensor=8")
  with pytest.raises(ValueError, match=r"mesh\.tensor=8 does not divide dimension 1 \('heads', "
                                       r"size 4\) of \.params\['layers_0'\]\['self_attn'\]"
                                       r"\['kv_b_proj'\]"):
    _trainer("mesh.tensor=8", "model.vocab_size=264")
  with pytest.raises(ValueError, match=r"train\.batch_size=4 .*mesh\.data x mesh\.fsdp = 8"):
    _trainer("mesh.data=2", "mesh.fsdp=4", "train.batch_size=4")


@pytest.mark.parametrize("cache_dtype", [None, "int8", "int4"])
def test_sharded_latent_cache_decode_equals_unsharded(cache_dtype):
  """Also for the quantized caches: codes, per-token scales and the RoPE key all sharded over
  data x sequence, each step equal to the same quantized cache on one device."""
  cfg = dataclasses.replace(load_config(None, *MODEL, *TRAIN).model, cache_dtype=cache_dtype)
  model = mla_jax.Transformer(cfg)
  batch, max_len, prompt_len, steps = 2, 32, 8, 16
  tokens = jax.random.randint(jax.random.key(0), (batch, prompt_len + steps), 0, cfg.vocab_size)
  params = model.init(jax.random.key(1), tokens[:, :1])["params"]

  def run(mesh):
    cache = mla_jax.init_cache(cfg, batch, max_len)
    p, c = (params, cache) if mesh is None else (shard(params, mesh), shard(cache, mesh))
    if mesh is None:
      apply = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c), donate_argnums=2)
    else:
      apply = sharded_cached_apply(model, mesh, p, c)
    logits, c = apply(p, tokens[:, :prompt_len], c)
    outputs, layouts = [logits], []
    for i in range(prompt_len, prompt_len + steps):
      logits, c = apply(p, tokens[:, i:i + 1], c)
      outputs.append(logits)
      layouts.append(c)
    return jnp.concatenate(outputs, axis=1), layouts, c

  expected, _, plain_cache = run(None)
  mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 1, "sequence": 4})
  got, caches, final = run(mesh)
  assert rel_err(got, expected) <= 1e-5
  latent = NamedSharding(mesh, P("data", "sequence", None))
  for cache in caches:  # after every step: the declared layout, unchanged
    for layer in cache.layers:
      assert layer.c_kv.sharding == latent and layer.k_rope.sharding == latent
      if cache_dtype is not None:
        assert layer.c_kv_scale.sharding == latent
    assert cache.lengths.sharding == NamedSharding(mesh, P("data"))
  c_kv = final.layers[0].c_kv
  assert {s.data.nbytes for s in c_kv.addressable_shards} == {c_kv.nbytes // 8}  # 2 x 4 ways
  width = cfg.kv_lora_rank // 2 if cache_dtype == "int4" else cfg.kv_lora_rank  # int4: 2 per byte
  assert {s.data.shape for s in c_kv.addressable_shards} == {(1, max_len // 4, width)}
  np.testing.assert_array_equal(final.lengths, plain_cache.lengths)


def test_checkpoint_saved_under_one_mesh_restores_under_another(tmp_path):
  fsdp = _trainer("mesh.fsdp=8")
  state = fsdp.init_state()
  inputs, targets = _batches(1)[0]
  state, _ = fsdp.train_step(state, *fsdp.put_batch(inputs, targets))
  checkpoints = Checkpoints(tmp_path, 2)
  checkpoints.save(1, state, {"model": {}}, wait=True)
  other = _trainer("mesh.data=2", "mesh.tensor=4")
  restored = checkpoints.restore(1, other.abstract_state())
  checkpoints.close()
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored, state)
  assert restored.params["embed_tokens"].sharding.spec == P("tensor", "fsdp")  # fsdp is 1 here
  assert restored.params["embed_tokens"].addressable_shards[0].data.shape == (65, 32)
  jax.tree_util.tree_map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim) or pytest.fail(str(a)),
                         restored, other.state_shardings)


def _train_args(workdir, *extra):
  return [sys.executable, "-m", "mla_jax.cli", "train", f"workdir={workdir}", f"data.path={DATA}",
          *MODEL, "train.batch_size=8", "train.seq_len=32", "train.warmup_steps=1",
          "train.steps=6", "train.log_every=1", "train.eval_every=3", "train.eval_batches=2",
          "train.checkpoint_every=3", "train.sample_tokens=0", *extra]


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _losses(workdir):
  return [(r["step"], r["loss"]) for r in read_metrics(workdir) if "loss" in r]


@pytest.mark.slow  # 40 s of CLI training; test_sharded_training_step_equals_one_device covers it
def test_cli_tensor_parallel_losses_equal_one_device(tmp_path):
  one = subprocess.run(_train_args(tmp_path / "one"), env=_env(1), capture_output=True,
                       text=True, timeout=300)
  assert one.returncode == 0, one.stderr
  sharded = subprocess.run(_train_args(tmp_path / "tp", "mesh.data=2", "mesh.tensor=4"),
                           env=_env(8), capture_output=True, text=True, timeout=300)
  assert sharded.returncode == 0, sharded.stderr
  assert "8 device(s) in 1 process(es), mesh data=2 x fsdp=1 x tensor=4 x sequence=1" in sharded.stdout
  a, b = _losses(tmp_path / "one"), _losses(tmp_path / "tp")
  assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
  np.testing.assert_allclose([l for _, l in b], [l for _, l in a], rtol=1e-5)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  """2 processes x 2 CPU devices with jax.distributed over gloo == 1 process x 4 devices."""
  single = subprocess.run(_train_args(tmp_path / "single"), env=_env(4), capture_output=True,
                          text=True, timeout=300)
  assert single.returncode == 0, single.stderr
  port = _free_port()
  workdir = tmp_path / "multi"
  procs = [subprocess.Popen(_train_args(workdir, "--coordinator", f"127.0.0.1:{port}",
                                        "--num-processes", "2", "--process-id", str(i)),
                            env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    outputs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:  # never leave a process behind, even on a timeout
      p.kill()
      p.wait()
  assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
  assert "4 device(s) in 2 process(es)" in outputs[0][0]
  ours = [line for line in outputs[1][0].splitlines() if "[Gloo]" not in line]  # gloo's own
  assert ours == []  # only process 0 logs
  a, b = _losses(tmp_path / "single"), _losses(workdir)
  assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
  np.testing.assert_allclose([l for _, l in b], [l for _, l in a], rtol=1e-5)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]


@pytest.mark.slow  # 40 s; the expert-parallel dispatch itself is checked in tests/layers/test_moe.py
def test_moe_training_step_splits_experts_over_tensor_and_equals_one_device():
  moe = ["model.n_routed_experts=4", "model.num_experts_per_tok=2", "model.n_shared_experts=1",
         "model.moe_intermediate_size=16", "model.first_k_dense_replace=1",
         "model.aux_loss_alpha=0.01"]
  one = _trainer(*moe, devices=jax.devices()[:1])
  split = _trainer(*moe, "mesh.data=2", "mesh.tensor=4")
  initial = one.init_state()
  state_one = jax.device_put(jax.device_get(initial), one.state_shardings)
  state_split = jax.device_put(jax.device_get(initial), split.state_shardings)
  inputs, targets = _batches(1)[0]
  state_one, m_one = one.train_step(state_one, *one.put_batch(inputs, targets))
  state_split, m_split = split.train_step(state_split, *split.put_batch(inputs, targets))
  assert float(m_split["loss"]) == pytest.approx(float(m_one["loss"]), rel=1e-5)
  for got, want in zip(jax.tree_util.tree_leaves(state_split.params),
                       jax.tree_util.tree_leaves(state_one.params)):
    assert rel_err(got, want) <= 1e-5
  mlp = state_split.params["layers_1"]["mlp"]
  assert mlp["experts_gate_proj"].sharding.spec == P("tensor", "fsdp", None)
  assert mlp["gate"].sharding.spec == P("fsdp", "tensor")
  assert {s.data.shape for s in mlp["experts_down_proj"].addressable_shards} == {(1, 16, 32)}
  # The balance loss is part of what is optimised: removing it changes the loss.
  no_aux = _trainer(*moe[:-1], devices=jax.devices()[:1])
  _, m_plain = no_aux.train_step(jax.device_put(jax.device_get(initial), no_aux.state_shardings),
                                 *no_aux.put_batch(inputs, targets))
  assert float(m_one["loss"]) > float(m_plain["loss"])


def test_sharded_cached_apply_with_absorbed_weights_equals_one_device():
  """absorbed= : W_UK / W_UV laid out over the heads' mesh axis; same logits as one device."""
  cfg = dataclasses.replace(TINY_CONFIGS["q_lora"], vocab_size=96)  # tensor=2 splits the vocab
  model = mla_jax.Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, cfg.vocab_size)
  params = model.init(jax.random.key(1), tokens)["params"]
  cache = mla_jax.init_cache(cfg, 2, 16)
  want, _ = model.apply({"params": params}, tokens, cache=cache)
  mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 2, "sequence": 2})
  absorbed = mla_jax.absorbed_weights(cfg, params)
  run = sharded_cached_apply(model, mesh, shard(params, mesh), shard(cache, mesh),
                             absorbed=shard(absorbed, mesh))
  got, _ = run(shard(params, mesh), tokens, shard(cache, mesh), shard(absorbed, mesh))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
