"""flash_attention's argument checks (mla_jax/layers/flash_checks.py): each bad argument is a
ValueError that names it, through the public entry point."""

import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.layers.flash_attention import flash_attention
from tests.helpers import TINY_CONFIGS, flash_operands, variant


def test_bad_operands_are_named():
  q, k, v, q_rope, k_rope = flash_operands(1, 8, 8, 4, 4, 8, 8, 4)
  with pytest.raises(ValueError, match="H must be a multiple of G"):
    flash_attention(q, k[:, :, :3], v[:, :, :3], scale=1.0)
  with pytest.raises(ValueError, match="q_rope and k_rope go together"):
    flash_attention(q, k, v, q_rope=q_rope, scale=1.0)
  with pytest.raises(ValueError, match="v .* does not fit k"):
    flash_attention(q, k, v[:, :5], scale=1.0)
  with pytest.raises(ValueError, match="pass query_offsets"):
    flash_attention(q, k[:, :6], v[:, :6], scale=1.0)
  with pytest.raises(ValueError, match="block_q=0 is invalid"):
    flash_attention(q, k, v, scale=1.0, block_q=0)
  with pytest.raises(ValueError, match="model.flash_block_k"):
    variant(TINY_CONFIGS["q_lora"], flash_block_k=0)
  with pytest.raises(ValueError, match="q has dtype int32: flash_attention needs floating"):
    flash_attention(q.astype(jnp.int32), k, v, scale=0.25)
  with pytest.raises(ValueError, match="must be non-empty"):
    flash_attention(q[:, :0], k[:, :0], v[:, :0], scale=1.0)
  with pytest.raises(ValueError, match=r"kv_lengths holds \[9\]: each must be in \[0, S=8\]"):
    flash_attention(q, k, v, scale=1.0, query_offsets=[0], kv_lengths=[9])
  with pytest.raises(ValueError, match="query_offsets has dtype float32"):
    flash_attention(q, k, v, scale=1.0, query_offsets=[0.5])
  with pytest.raises(ValueError, match=r"query_offsets has shape \(\), expected \[1\]"):
    flash_attention(q, k, v, scale=1.0, query_offsets=0)
  with pytest.raises(ValueError, match=r"query_offsets holds \[-1\]: each must be >= 0"):
    flash_attention(q, k, v, scale=1.0, query_offsets=[-1], kv_lengths=[8])
  for scale in (None, "0.5", np.ones(2), True):
    with pytest.raises(ValueError, match=r"^scale=.* is invalid: .* softmax scale as a real"):
      flash_attention(q, k, v, scale=scale)
  # offsets and lengths as lists, and numpy block sizes, are what arrays and ints are
  as_lists = flash_attention(q, k, v, scale=1.0, query_offsets=[0], kv_lengths=[8],
                             block_q=np.int64(4), block_k=4)
  np.testing.assert_array_equal(as_lists, flash_attention(
      q, k, v, scale=1.0, query_offsets=jnp.zeros(1, jnp.int32),
      kv_lengths=jnp.full(1, 8, jnp.int32), block_q=4, block_k=4))
