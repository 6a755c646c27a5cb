"""bench.moe helpers: the LLVM kernel count behind the scan-compile rows."""

import jax
import jax.numpy as jnp

from mla_jax.bench.moe import llvm_kernel_count


def test_llvm_kernel_count_counts_distinct_kernels():
  x = jnp.ones((4, 4), jnp.float32)
  one = jax.jit(lambda x: jnp.sin(x) * 2.0).lower(x)  # one elementwise fusion
  two = jax.jit(lambda x: (jnp.sin(x) * 2.0, jnp.cos(x).sum())).lower(x)  # + a reduction
  # The same fusion twice on equal shapes: XLA compiles it once, as for unrolled layers.
  twice = jax.jit(lambda x, y: (jnp.sin(x) * 2.0, jnp.sin(y) * 2.0)).lower(x, x + 1)
  assert llvm_kernel_count(one) == 1
  assert llvm_kernel_count(two) == 2
  assert llvm_kernel_count(twice) == 1
