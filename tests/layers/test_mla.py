"""MultiHeadLatentAttention: every intermediate's shape, both paths against an independent NumPy
reference written the textbook way (per-head keys [k_nope, k_rope] concatenated), and NNX use."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import bridge

import mla_jax
from mla_jax.config import yarn_get_mscale
from mla_jax.layers.rope import rope_inv_freq
from tests.helpers import TINY_CONFIGS, rel_err, variant

B, T = 2, 7


def _init(cfg, seed=0):
  layer = mla_jax.MultiHeadLatentAttention(cfg)
  x = jax.random.normal(jax.random.key(seed), (B, T, cfg.hidden_size))
  params = layer.init(jax.random.key(seed + 1), x)["params"]
  return layer, params, x


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("attn_impl", ["naive", "absorbed"])
def test_intermediate_shapes(name, attn_impl):
  cfg = TINY_CONFIGS[name]
  layer, params, x = _init(cfg)
  (y, cache), state = layer.apply({"params": params}, x, attn_impl=attn_impl,
                                  mutable=["intermediates"])
  got = {k: v[0] for k, v in state["intermediates"].items()}
  h, n, r, v, c = (cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                   cfg.kv_lora_rank)
  expected = {"q_nope": (B, T, h, n), "q_rope": (B, T, h, r), "c_kv": (B, T, c), "k_rope": (B, T, r),
              "probs": (B, h, T, T), "attn_out": (B, T, h, v)}
  if attn_impl == "naive":
    expected.update(k_nope=(B, T, h, n), values=(B, T, h, v))
  else:
    expected.update(q_lat=(B, T, h, c), out_lat=(B, T, h, c))
  assert set(got) == set(expected)
  for key, shape in expected.items():
    chex.assert_shape(got[key], shape, custom_message=key)
  chex.assert_shape(y, (B, T, cfg.hidden_size))
  assert cache is None
  # Parameter shapes follow Hugging Face's modules with the input axes first.
  d = cfg.hidden_size
  chex.assert_shape(params["kv_a_proj_with_mqa"], (d, c + r))
  chex.assert_shape(params["kv_b_proj"], (c, h, n + v))
  chex.assert_shape(params["o_proj"], (h, v, d))
  if cfg.q_lora_rank is None:
    chex.assert_shape(params["q_proj"], (d, h, n + r))
  else:
    chex.assert_shape(params["q_b_proj"], (cfg.q_lora_rank, h, n + r))


def _rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope_ref(x, inv_freq, factor, interleave):
  """Rotation as complex multiplication, written independently of mla_jax.layers.rope."""
  t = x.shape[1]
  angles = np.arange(t)[:, None] * inv_freq  # [T,R/2]
  rot = (np.cos(angles) + 1j * np.sin(angles))[None, :, None, :] * factor
  half = x.shape[-1] // 2
  if interleave:
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * rot
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out
  z = (x[..., :half] + 1j * x[..., half:]) * rot
  return np.concatenate([z.real, z.imag], axis=-1)


def reference_mla(cfg, params, x):
  """Causal MLA in float64 NumPy, no cache: the DeepSeek-V2 paper's equations."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  n, r, c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
  eps = cfg.rms_norm_eps
  if cfg.q_lora_rank is None:
    q = np.einsum("btd,dhk->bthk", x, p["q_proj"])
  else:
    q_a = _rms(x @ p["q_a_proj"], p["q_a_layernorm"]["scale"], eps)
    q = np.einsum("btq,qhk->bthk", q_a, p["q_b_proj"])
  kv_a = x @ p["kv_a_proj_with_mqa"]
  c_kv = _rms(kv_a[..., :c], p["kv_a_layernorm"]["scale"], eps)
  kv = np.einsum("btc,chm->bthm", c_kv, p["kv_b_proj"])
  k_nope, v = kv[..., :n], kv[..., n:]
  yarn = cfg.rope_scaling
  factor, scale = 1.0, (n + r) ** -0.5
  if yarn is not None:
    factor = yarn_get_mscale(yarn.factor, yarn.mscale) / yarn_get_mscale(yarn.factor, yarn.mscale_all_dim)
    scale *= (0.1 * yarn.mscale_all_dim * np.log(yarn.factor) + 1.0) ** 2
  inv_freq = rope_inv_freq(cfg).astype(np.float64)
  q_rope = _rope_ref(q[..., n:], inv_freq, factor, cfg.rope_interleave)
  k_rope = _rope_ref(kv_a[:, :, None, c:], inv_freq, factor, cfg.rope_interleave)
  keys = np.concatenate([k_nope, np.broadcast_to(k_rope, k_nope.shape[:-1] + (r,))], axis=-1)
  queries = np.concatenate([q[..., :n], q_rope], axis=-1)
  scores = np.einsum("bthk,bshk->bhts", queries, keys) * scale
  t = x.shape[1]
  scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bhts,bshv->bthv", probs, v)
  return np.einsum("bthv,hvd->btd", out, p["o_proj"])


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("attn_impl", ["naive", "absorbed"])
def test_matches_numpy_reference(name, interleave, attn_impl):
  cfg = variant(TINY_CONFIGS[name], rope_interleave=interleave)
  layer, params, x = _init(cfg)
  y, _ = layer.apply({"params": params}, x, attn_impl=attn_impl)
  assert rel_err(y, reference_mla(cfg, params, x)) <= 1e-5


def test_reference_sees_a_forgotten_softmax_mscale():
  """The YaRN config's softmax scale differs from plain (N+R)^-0.5 enough to fail the check above."""
  cfg = TINY_CONFIGS["q_lora_yarn_5_heads"]
  layer, params, x = _init(cfg)
  y, _ = layer.apply({"params": params}, x)
  forgot = variant(cfg, rope_scaling={"type": "yarn", "factor": cfg.rope_scaling.factor,
                                      "original_max_position_embeddings": 16, "mscale": 0.707,
                                      "mscale_all_dim": 0.0})
  assert cfg.softmax_scale / forgot.softmax_scale > 1.2
  assert rel_err(layer.apply({"params": params}, x)[0], y) == 0.0
  assert rel_err(mla_jax.MultiHeadLatentAttention(forgot).apply({"params": params}, x)[0],
                 reference_mla(cfg, params, x)) > 1e-3


def test_bf16_activations_stay_close_to_float32():
  cfg = TINY_CONFIGS["q_lora"]
  layer, params, x = _init(cfg)
  y32, _ = layer.apply({"params": params}, x)
  for impl in ("naive", "absorbed"):
    y16, _ = mla_jax.MultiHeadLatentAttention(variant(cfg, dtype="bfloat16")).apply(
        {"params": params}, x, attn_impl=impl)
    assert y16.dtype == jnp.bfloat16
    assert rel_err(y16, y32) < 3e-2  # bf16 keeps ~3 significant digits; softmax is float32


def test_unknown_attn_impl_is_refused():
  layer, params, x = _init(TINY_CONFIGS["q_lora"])
  with pytest.raises(ValueError, match="attn_impl='fast'"):
    layer.apply({"params": params}, x, attn_impl="fast")


def test_nnx_bridge_gives_the_linen_output():
  cfg = TINY_CONFIGS["q_lora_yarn_5_heads"]
  linen_layer = mla_jax.MultiHeadLatentAttention(cfg)
  x = jax.random.normal(jax.random.key(3), (B, T, cfg.hidden_size))
  nnx_layer = bridge.ToNNX(linen_layer, rngs=nnx.Rngs(0))
  bridge.lazy_init(nnx_layer, x)
  params = nnx.to_pure_dict(nnx.state(nnx_layer, nnx.Param))
  for impl in ("naive", "absorbed"):
    y_nnx, _ = nnx_layer(x, attn_impl=impl)
    y_linen, _ = linen_layer.apply({"params": params}, x, attn_impl=impl)
    np.testing.assert_array_equal(np.asarray(y_nnx), np.asarray(y_linen))
  # And with a latent cache through NNX: prefill then one decode step.
  cache = mla_jax.init_cache(cfg, B, 16).layers[0]
  lengths = jnp.zeros((B,), jnp.int32)
  _, cache = nnx_layer(x, cache=cache, lengths=lengths)
  step_x = jax.random.normal(jax.random.key(4), (B, 1, cfg.hidden_size))
  y_step, _ = nnx_layer(step_x, cache=cache, lengths=lengths + T)
  full, _ = linen_layer.apply({"params": params}, jnp.concatenate([x, step_x], axis=1))
  assert rel_err(y_step[:, 0], full[:, -1]) <= 1e-5


# --- Absorbed weights: kv_b_proj split once into head-major W_UK and W_UV ----------------------

@pytest.mark.parametrize("scan", [False, True])
def test_absorbed_weights_are_kv_b_proj_split_head_major_and_change_no_logit(scan):
  cfg = variant(TINY_CONFIGS["q_lora_yarn_5_heads"], num_layers=3, scan_layers=scan)
  model = mla_jax.Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(0), (B, T), 0, cfg.vocab_size)
  params = model.init(jax.random.key(1), tokens)["params"]
  absorbed = mla_jax.absorbed_weights(cfg, params)
  h, n, v, c = cfg.num_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
  kv_b = params["layers"]["self_attn"]["kv_b_proj"][1] if scan else (
      params["layers_1"]["self_attn"]["kv_b_proj"])  # [C,H,N+V]
  got = (absorbed["layers"]["self_attn"] if scan else absorbed["layers_1"]["self_attn"])
  w_uk, w_uv = (got["w_uk"][1], got["w_uv"][1]) if scan else (got["w_uk"], got["w_uv"])
  assert w_uk.shape == (h, n, c) and w_uv.shape == (h, c, v)
  np.testing.assert_array_equal(w_uk, np.einsum("chn->hnc", kv_b[..., :n]))
  np.testing.assert_array_equal(w_uv, np.einsum("chv->hcv", kv_b[..., n:]))
  cache = mla_jax.init_cache(cfg, B, 16)
  _, cache = model.apply({"params": params}, tokens, cache=cache, attn_impl="naive")
  step = tokens[:, :1]
  reference, _ = model.apply({"params": params}, step, cache=cache, attn_impl="absorbed")
  for impl in ("absorbed", "flash"):
    with_absorbed, _ = model.apply({"params": params, "absorbed": absorbed}, step, cache=cache,
                                   attn_impl=impl)
    assert rel_err(with_absorbed, reference) <= 1e-6


def test_absorbed_weights_refuse_a_kv_b_proj_of_another_config():
  cfg = TINY_CONFIGS["q_lora"]
  params = mla_jax.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  other = variant(cfg, kv_lora_rank=cfg.kv_lora_rank * 2)
  with pytest.raises(ValueError, match=r"params/layers_0/self_attn/kv_b_proj has shape"):
    mla_jax.absorbed_weights(other, params)
  assert mla_jax.absorbed_weights(variant(cfg, attention="mha"), mla_jax.Transformer(
      variant(cfg, attention="mha")).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))[
          "params"]) == {}  # no MLA layer: nothing to absorb


def test_absorbed_weights_refuse_what_would_be_silently_ignored_or_wrong():
  """A wrapped variables dict, another model's tree, the other layer layout, and an 'absorbed'
  collection of another shape are each refused, naming the problem."""
  cfg = variant(TINY_CONFIGS["q_lora"], num_layers=2)
  model = mla_jax.Transformer(cfg)
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  with pytest.raises(ValueError, match=r"variables dict \{'params': \.\.\.\}"):
    mla_jax.absorbed_weights(cfg, {"params": params})
  mha = variant(cfg, attention="mha")
  mha_params = mla_jax.Transformer(mha).init(jax.random.key(0), tokens)["params"]
  with pytest.raises(ValueError, match="params hold no kv_b_proj"):
    mla_jax.absorbed_weights(cfg, mha_params)
  scanned = variant(cfg, scan_layers=True)
  with pytest.raises(ValueError, match="unrolled layout but model.scan_layers is True"):
    mla_jax.absorbed_weights(scanned, params)
  scanned_params = mla_jax.Transformer(scanned).init(jax.random.key(0), tokens)["params"]
  with pytest.raises(ValueError, match="scan layout .* model.scan_layers is False"):
    mla_jax.absorbed_weights(cfg, scanned_params)
  wider = variant(cfg, num_heads=cfg.num_heads * 2)
  wide_params = mla_jax.Transformer(wider).init(jax.random.key(0), tokens)["params"]
  wrong = mla_jax.absorbed_weights(wider, wide_params)
  cache = mla_jax.init_cache(cfg, 1, 8)
  with pytest.raises(ValueError, match="'absorbed' collection's w_uk"):
    model.apply({"params": params, "absorbed": wrong}, tokens[:, :1], cache=cache)
