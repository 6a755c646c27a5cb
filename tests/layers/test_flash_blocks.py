"""Flash attention's block layout (mla_jax/layers/flash_blocks.py): which key blocks each query
block visits, traced and static, and that the skipped ones do not reach a result."""

import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.layers.flash_attention import flash_attention
from mla_jax.layers.flash_blocks import (balanced_block, key_blocks_to_visit, static_visits,
                                         to_blocks)
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
  bq, bk = balanced_block(t, block_q), balanced_block(t, block_k)
  assert static_visits(t, bq, bk, blocks.k.shape[0]) == tuple(
      np.asarray(key_blocks_to_visit(blocks)).tolist())


@pytest.mark.parametrize("length,block,expected", [
    (257, 256, 136),  # two blocks of 136 (15 rows of padding), not two of 256 (255)
    (300, 256, 152), (513, 256, 176),
    (1024, 256, 256), (4096, 1024, 1024),  # lengths that divide: the block as given
    (20, 64, 20), (1, 256, 1),  # one block: exactly the length
    (37, 16, 16), (100, 37, 37)])  # a multiple of 8 only where it stays within the block
def test_blocks_are_balanced_so_padding_stays_small(length, block, expected):
  size = balanced_block(length, block)
  assert size == expected
  blocks = -(-length // size)
  assert blocks == -(-length // block)  # as many blocks as the block size asks for
  assert blocks * size - length < 8 * blocks  # under 8 rows of padding per block


def test_a_query_block_past_a_power_of_two_is_cut_evenly():
  """257 tokens at blocks of 256: 2 query blocks and 2 key blocks of 136, so causal attention
  visits 3 pairs of 136 x 136 (about the naive path's 257 x 257 scores), not 3 of 256 x 256."""
  q, k, v, _, _ = flash_operands(1, 257, 257, 2, 2, 8, 8, 0)
  blocks = to_blocks(q, k, v, None, None, None, None, 256, 256)
  assert blocks.q.shape[:1] + blocks.q.shape[3:4] == (2, 136)
  assert blocks.k.shape[:1] + blocks.k.shape[3:4] == (2, 136)
  np.testing.assert_array_equal(key_blocks_to_visit(blocks), [1, 2])
