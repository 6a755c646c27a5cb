"""mla-jax: Multi-head Latent Attention (DeepSeek-V2/V3) for JAX and Flax.

The public names below are imported on first use (PEP 562), so `import mla_jax` and the
`mla-jax` command start without importing JAX; the command sets its signal handlers first.
"""

from mla_jax.interrupts import exit_on_signals_if_the_command

exit_on_signals_if_the_command()  # the console script imports this package first

from importlib.metadata import PackageNotFoundError, version  # noqa: E402  (after the handlers)

from mla_jax._lazy import lazy_exports

try:
  __version__ = version("mla-jax")
except PackageNotFoundError:  # running from a source tree that was never installed
  __version__ = "0.0.0+unknown"

_PUBLIC = {  # name -> the module that defines it
    "Cache": "mla_jax.cache", "KVCache": "mla_jax.cache", "LatentCache": "mla_jax.cache",
    "cache_bytes": "mla_jax.cache", "init_cache": "mla_jax.kinds",
    "init_layer_cache": "mla_jax.kinds",
    "Config": "mla_jax.config.run", "ModelConfig": "mla_jax.config.model",
    "YarnScaling": "mla_jax.config.model", "load_config": "mla_jax.config.loader",
    "load_hf": "mla_jax.hf.load", "save_hf": "mla_jax.hf.export",
    "load_run": "mla_jax.runs", "Run": "mla_jax.runs",
    "MultiHeadAttention": "mla_jax.layers.attention",
    "MultiHeadLatentAttention": "mla_jax.layers.mla", "absorbed_weights": "mla_jax.kinds",
    "flash_attention": "mla_jax.layers.flash_attention",
    "SwiGLU": "mla_jax.layers.mlp",
    "DeepSeekMoE": "mla_jax.layers.moe",
    "RMSNorm": "mla_jax.layers.norms",
    "Transformer": "mla_jax.model",
    "generate": "mla_jax.sampling", "stream": "mla_jax.sampling",
    "PagedCache": "mla_jax.paged_cache", "init_paged_cache": "mla_jax.kinds",
    "Engine": "mla_jax.serving.engine", "SamplingParams": "mla_jax.serving.requests",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC, listed=["__version__"])
