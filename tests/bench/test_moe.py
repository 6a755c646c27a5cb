"""bench.moe helpers: the LLVM kernel count behind the scan-compile rows."""

import jax
import jax.numpy as jnp

from mla_jax.bench.moe import llvm_kernels


def test_llvm_kernels_counts_distinct_kernels():
  x = jnp.ones((4, 4), jnp.float32)
  one = jax.jit(lambda x: jnp.sin(x) * 2.0).lower(x)  # one elementwise fusion
  two = jax.jit(lambda x: (jnp.sin(x) * 2.0, jnp.cos(x).sum())).lower(x)  # + a reduction
  # The same fusion twice on equal shapes: XLA compiles it once, as for unrolled layers.
  twice = jax.jit(lambda x, y: (jnp.sin(x) * 2.0, jnp.sin(y) * 2.0)).lower(x, x + 1)
  assert sum(llvm_kernels(one).values()) == 1
  assert sum(llvm_kernels(twice).values()) == 1
  kinds = llvm_kernels(two)
  assert sum(kinds.values()) == 2 and any("reduce" in kind for kind in kinds), kinds
