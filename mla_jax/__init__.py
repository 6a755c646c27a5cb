"""mla-jax: Multi-head Latent Attention (DeepSeek-V2/V3) for JAX and Flax."""

from importlib.metadata import PackageNotFoundError, version

from mla_jax.cache import (Cache, KVCache, LatentCache, cache_bytes, init_cache,
                           init_layer_cache)
from mla_jax.config import Config, ModelConfig, YarnScaling, load_config
from mla_jax.hf import load_hf
from mla_jax.layers.attention import MultiHeadAttention
from mla_jax.layers.mla import MultiHeadLatentAttention
from mla_jax.layers.mlp import SwiGLU
from mla_jax.layers.moe import DeepSeekMoE
from mla_jax.layers.norms import RMSNorm
from mla_jax.model import Transformer
from mla_jax.sampling import generate, stream

try:
  __version__ = version("mla-jax")
except PackageNotFoundError:  # running from a source tree that was never installed
  __version__ = "0.0.0+unknown"

__all__ = [
    "Cache", "Config", "DeepSeekMoE", "KVCache", "LatentCache", "ModelConfig",
    "MultiHeadAttention", "MultiHeadLatentAttention", "RMSNorm", "SwiGLU", "Transformer",
    "YarnScaling", "__version__", "cache_bytes", "generate", "init_cache", "init_layer_cache",
    "load_config", "load_hf", "stream",
]
