"""Dependencies by use: the layers, the model, the cache and generation need only the core
packages (jax, flax, numpy, pyyaml, ml_dtypes, and what flax itself requires); the CLI's extras
are imported where they are used.

Each test runs a fresh Python in which the non-core packages cannot be imported (an import
hook raises ModuleNotFoundError for them, as on a machine where they were never installed), so
a stray top-level import anywhere on the path fails here.
"""

import subprocess
import sys
import textwrap

import pytest

# Installed by `pip install -e .` for the CLI, or by the test extras; never needed by the layers.
NOT_CORE = ("matplotlib", "tensorboardX", "tqdm", "tokenizers", "chex", "safetensors", "torch",
            "transformers", "fastapi", "uvicorn", "httpx")
# Installed with flax (its own requirements), but not imported by the Linen layers, the model or
# generation: importing them costs seconds.
TRAINING_ONLY = ("optax", "orbax")

BLOCK_NON_CORE = textwrap.dedent(f"""
    import importlib.abc, sys

    class NotInstalled(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {NOT_CORE!r}:
          raise ModuleNotFoundError(f"No module named {{name!r}} (not a core dependency)",
                                    name=name)
        return None

    sys.meta_path.insert(0, NotInstalled())
""")


def _run(code: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", BLOCK_NON_CORE + textwrap.dedent(code)],
                        capture_output=True, text=True, timeout=300)


def test_the_hook_refuses_non_core_packages():
  """The hook itself works: without it this test module would prove nothing."""
  result = _run("import matplotlib")
  assert result.returncode != 0 and "not a core dependency" in result.stderr


def test_layers_model_cache_and_generation_need_only_the_core_packages():
  result = _run("""
      import jax, jax.numpy as jnp, numpy as np
      import mla_jax

      cfg = mla_jax.ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2,
                                q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                                qk_rope_head_dim=8, v_head_dim=8, intermediate_size=64,
                                max_seq_len=32)
      model = mla_jax.Transformer(cfg)
      params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
      cache = mla_jax.init_cache(cfg, batch_size=1, max_len=16)
      logits, cache = model.apply({"params": params}, jnp.ones((1, 4), jnp.int32), cache=cache)
      assert logits.shape == (1, 4, 64) and cache.lengths.tolist() == [4]
      out = mla_jax.generate(model, params, [[1, 2, 3]], max_new_tokens=3, temperature=0.0)
      assert out.shape == (1, 6)
      assert mla_jax.absorbed_weights(cfg, params)
      assert mla_jax.load_config(None).model.attention == "mla"
      print(sorted(m for m in sys.modules if m.split(".")[0] in {TRAINING_ONLY!r}))
      from flax import nnx  # flax.nnx itself imports optax

      layer = nnx.bridge.ToNNX(mla_jax.MultiHeadLatentAttention(cfg), rngs=nnx.Rngs(0))
      nnx.bridge.lazy_init(layer, jnp.ones((1, 3, 32)))
      assert layer(jnp.ones((1, 3, 32)))[0].shape == (1, 3, 32)
  """.replace("{TRAINING_ONLY!r}", repr(TRAINING_ONLY)))
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["MultiHeadLatentAttention", "Transformer", "init_cache",
                                  "generate", "load_config", "load_hf"])
def test_public_names_import_without_the_cli_extras(name):
  result = _run(f"import mla_jax; mla_jax.{name}")
  assert result.returncode == 0, result.stderr
