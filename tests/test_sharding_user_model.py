"""A user's own Linen or NNX model holding the library's layers shards with the user's rules:
the library's parameters by their logical axes (annotations or the name tables), the user's by
their own annotations, and the outputs equal one device's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import mla_jax
import mla_jax.nnx as mnnx
from mla_jax.config import ModelConfig
from mla_jax.sharding import make_mesh, shard, tree_shardings

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, q_lora_rank=16,
                     kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                     intermediate_size=48, max_seq_len=32)
RULES = [("user_mlp", "tensor"), ("batch", "data")]  # the user's own logical name, and one override
X = jax.random.normal(jax.random.key(0), (4, 6, 32))


class UserModel(nn.Module):
  """MLA between the user's own Dense layers, annotated with a logical name of their own."""

  annotate: bool = True

  @nn.compact
  def __call__(self, x):
    def kernel(names):
      init = nn.initializers.lecun_normal()
      return nn.with_logical_partitioning(init, names) if self.annotate else init

    y, _ = mla_jax.MultiHeadLatentAttention(CONFIG)(x)
    h = nn.gelu(nn.Dense(64, use_bias=False, kernel_init=kernel(("embed", "user_mlp")))(x + y))
    return nn.Dense(32, use_bias=False, kernel_init=kernel(("user_mlp", "embed")))(h)


def _mesh():
  return make_mesh({"data": 2, "fsdp": 1, "tensor": 4, "sequence": 1})


def test_a_user_linen_model_shards_with_the_users_rules_and_equals_one_device():
  model = UserModel()
  params = model.init(jax.random.key(1), X)["params"]  # the user's leaves boxed, MLA's plain
  mesh = _mesh()
  sharded = shard(params, mesh, rules=RULES)
  assert sharded["Dense_0"]["kernel"].value.sharding.spec == P(("fsdp",), ("tensor",))
  assert sharded["MultiHeadLatentAttention_0"]["q_b_proj"].sharding.spec == P(
      None, ("tensor",), None)  # heads over tensor, from the library's table
  x = jax.device_put(X, jax.sharding.NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    out = jax.jit(lambda p, x: model.apply({"params": p}, x))(sharded, x)
  want = model.apply({"params": params}, X)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_the_flax_route_reads_the_libraries_annotations_under_logical_axis_rules():
  """Under nn.logical_axis_rules the library's parameters are boxed with their logical axes, so
  nn.get_partition_spec and nn.logical_to_mesh_sharding place the whole model."""
  model = UserModel()
  rules = [("user_mlp", "tensor"), ("heads", "tensor"), ("embed", None), ("q_lora", None),
           ("kv_lora", None), ("head_dim", None), ("norm", None)]
  mesh = _mesh()
  with nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(model.init, jax.random.key(1), X)
    specs = nn.get_partition_spec(abstract)
    assert specs["params"]["MultiHeadLatentAttention_0"]["kv_b_proj"] == P(
        "kv_lora", "heads", "head_dim")
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(1), X)
  kv_b = variables["params"]["MultiHeadLatentAttention_0"]["kv_b_proj"]
  assert kv_b.value.sharding.spec == P(None, "tensor", None)
  plain = model.init(jax.random.key(1), X)["params"]  # outside the context: plain arrays
  assert isinstance(plain["MultiHeadLatentAttention_0"]["kv_b_proj"], jax.Array)
  np.testing.assert_allclose(nn.unbox(variables["params"])["MultiHeadLatentAttention_0"][
      "kv_b_proj"], plain["MultiHeadLatentAttention_0"]["kv_b_proj"], rtol=1e-6, atol=1e-9)
  # (the same draws: jit only rounds the normal sampler's last bit differently)
  # mla_jax.shard takes the boxed tree too, with the user's rules
  again = shard(variables["params"], mesh, rules=RULES)
  assert again["Dense_1"]["kernel"].value.sharding.spec == P(("tensor",), ("fsdp",))


def test_an_nnx_model_state_shards_by_its_metadata():
  model = mnnx.Transformer(CONFIG, rngs=nnx.Rngs(0))
  mesh = _mesh()
  state = shard(nnx.state(model, nnx.Param), mesh)
  nnx.update(model, state)
  assert model.layers_0.self_attn.kv_b_proj[...].sharding.spec == P(None, ("tensor",), None)
  tokens = jnp.arange(24, dtype=jnp.int32).reshape(4, 6)
  with jax.set_mesh(mesh):
    logits, _ = nnx.jit(lambda m, t: m(t))(model, tokens)
  params = jax.device_get(mnnx.model_params(model))
  want, _ = mla_jax.Transformer(CONFIG).apply({"params": params}, tokens)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_a_mesh_of_the_users_own_axis_names():
  """Rules onto a mesh named ('dp', 'mp'): the library's logical names are mapped there too, and
  the model's activation constraints keep only the axes that mesh has."""
  model = UserModel()
  params = model.init(jax.random.key(1), X)["params"]
  mesh = jax.make_mesh((2, 4), ("dp", "mp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = {"user_mlp": "mp", "heads": "mp", "embed": None, "batch": "dp"}
  placed = shard(params, mesh, rules=rules)
  assert placed["MultiHeadLatentAttention_0"]["kv_b_proj"].sharding.spec == P(None, ("mp",), None)
  with pytest.raises(ValueError, match=r"sharding rule \('embed', \('fsdp',\)\) .* names mesh "
                                       r"axis 'fsdp', which this mesh lacks \(its axes: dp, mp\)"):
    shard(params, mesh, rules={"user_mlp": "mp"})
  tokens = jnp.arange(24, dtype=jnp.int32).reshape(4, 6)
  lm = mla_jax.Transformer(CONFIG)
  lm_params = lm.init(jax.random.key(0), tokens)["params"]
  lm_rules = {"embed": None, "vocab": "mp", "heads": "mp", "mlp": "mp", "batch": "dp"}
  with jax.set_mesh(mesh):  # constrain() pins logits over ('data', 'fsdp'): not in this mesh
    logits, _ = jax.jit(lambda p, t: lm.apply({"params": p}, t))(
        shard(lm_params, mesh, rules=lm_rules), tokens)
  np.testing.assert_allclose(logits, lm.apply({"params": lm_params}, tokens)[0], atol=1e-5)


def test_an_unannotated_user_leaf_names_the_annotation_to_add():
  params = UserModel(annotate=False).init(jax.random.key(1), X)["params"]
  with pytest.raises(ValueError, match=r"no logical axes for array \['Dense_0'\]\['kernel'\] of "
                                       r"shape \(32, 64\): annotate it \(Linen: "
                                       r"nn.with_logical_partitioning\(init, \('...', '...'\)\)"):
    tree_shardings(params, _mesh())
  # or the user names its axes by leaf name
  shardings = tree_shardings(params, _mesh(), rules=RULES, axes={"kernel": ("embed", "user_mlp")})
  assert shardings["Dense_1"]["kernel"].spec == P(("fsdp",), ("tensor",))  # same name: same axes


def test_a_logical_name_without_a_rule_names_the_rule_to_add():
  params = UserModel().init(jax.random.key(1), X)["params"]
  with pytest.raises(ValueError, match=r"logical axis 'user_mlp' of \['Dense_0'\]\['kernel'\] has "
                                       r"no sharding rule: pass rules with \('user_mlp', <mesh "
                                       r"axes>\), e.g. \('user_mlp', 'tensor'\)"):
    shard(params, _mesh())
  with pytest.raises(ValueError, match=r"sharding rule \('user_mlp', \('tensr',\)\) for "
                                       r"\['Dense_0'\]\['kernel'\] names mesh axis 'tensr', which "
                                       r"this mesh lacks \(its axes: data, fsdp, tensor, sequence\)"):
    shard(params, _mesh(), rules=[("user_mlp", "tensr")])
  with pytest.raises(ValueError, match=r"sharding rule 'user_mlp' is invalid: each rule is a "
                                       r"\(logical name, mesh axes\) pair"):
    shard(params, _mesh(), rules=["user_mlp"])
