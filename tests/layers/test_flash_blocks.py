"""Flash attention's block layout (mla_jax/layers/flash_blocks.py): which key blocks each query
block visits, traced and static, and that the skipped ones do not reach a result."""

import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.layers.flash_attention import flash_attention
from mla_jax.layers.flash_blocks import key_blocks_to_visit, static_visits, to_blocks
from tests.helpers import flash_operands


def test_causal_blocks_past_the_diagonal_are_skipped():
  """The count of key blocks visited follows the diagonal (traced, with and without an offset),
  and the skip shows in the output: a query block's result does not depend on keys after its
  last position (changing them changes nothing)."""
  q, k, v, _, _ = flash_operands(1, 64, 64, 2, 2, 8, 8, 0)
  blocks = to_blocks(q, k, v, None, None, None, None, 16, 16)
  np.testing.assert_array_equal(key_blocks_to_visit(blocks), [1, 2, 3, 4])  # 10 of 16 pairs
  offset = to_blocks(q[:, :16], k, v, None, None, jnp.array([40]), jnp.array([56]), 16, 16)
  np.testing.assert_array_equal(key_blocks_to_visit(offset), [4])  # slots 0..55 only
  attend = lambda k: flash_attention(q, k, v, scale=1.0, block_q=16, block_k=16)  # noqa: E731
  changed = k.at[:, 32:].set(100.0)
  np.testing.assert_array_equal(attend(k)[:, :32], attend(changed)[:, :32])


@pytest.mark.parametrize("t,block_q,block_k", [(64, 16, 16), (37, 8, 16), (37, 16, 8),
                                               (20, 64, 64), (9, 4, 32)])
def test_static_visits_equal_the_traced_counts(t, block_q, block_k):
  q, k, v, _, _ = flash_operands(1, t, t, 2, 2, 8, 8, 0)
  blocks = to_blocks(q, k, v, None, None, None, None, block_q, block_k)
  assert static_visits(t, min(block_q, t), min(block_k, t), blocks.k.shape[0]) == tuple(
      np.asarray(key_blocks_to_visit(blocks)).tolist())
