"""train.remat: the same loss and gradients, and a smaller peak memory of the compiled training
step (XLA's memory analysis, no timing) on a config where activations dominate."""

import jax
import numpy as np
import pytest

import mla_jax
from mla_jax.config import load_config
from mla_jax.train import Trainer, loss_fn
from tests.helpers import SMALL_MODEL, rel_err

# Long sequence, narrow model: attention scores [B,H,T,T] and the MLP's activations dwarf the
# ~50k parameters. Layers scanned: unrolled, XLA's CPU scheduler computes the recomputation
# early and the peak hardly moves (measured: 116.6 -> 113.5 MB at 6 layers); a scan's backward
# loop cannot (108.6 -> 22.4 MB).
LONG = load_config(None, *[o for o in SMALL_MODEL if "max_seq_len" not in o],
                   "model.max_seq_len=256", "model.num_layers=4", "model.scan_layers=true").model


def _grad_step(remat):
  model = mla_jax.Transformer(LONG, remat=remat)
  return jax.jit(jax.value_and_grad(lambda p, x: loss_fn(model, p, x, x)))


def test_remat_lowers_peak_memory_of_a_training_step_and_keeps_the_numbers():
  tokens = jax.random.randint(jax.random.key(0), (8, 256), 0, LONG.vocab_size)
  params = mla_jax.Transformer(LONG).init(jax.random.key(1), tokens[:, :8])["params"]
  peak = {}
  for remat in ("none", "dots_saveable", "full"):
    memory = _grad_step(remat).lower(params, tokens).compile().memory_analysis()
    peak[remat] = memory.temp_size_in_bytes  # activations kept for the backward pass live here
  param_bytes = sum(p.nbytes for p in jax.tree_util.tree_leaves(params))
  assert peak["none"] > 20 * param_bytes  # the premise: activations dominate
  assert peak["full"] < 0.5 * peak["none"]
  assert peak["dots_saveable"] < peak["none"]
  (loss, grads), (loss_remat, grads_remat) = (_grad_step(r)(params, tokens)
                                              for r in ("none", "full"))
  assert float(loss_remat) == pytest.approx(float(loss), rel=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(grads_remat), jax.tree_util.tree_leaves(grads)):
    assert rel_err(a, b) <= 1e-5


def test_trainer_takes_remat_from_the_config_and_refuses_unknown_policies():
  config = load_config(None, *SMALL_MODEL, "train.seq_len=32", "train.remat=dots_saveable")
  assert Trainer.build(config, devices=jax.devices()[:1]).model.remat == "dots_saveable"
  with pytest.raises(ValueError, match=r"^train\.remat='some' is invalid: allowed: none, full"):
    load_config(None, "train.remat=some")
  with pytest.raises(ValueError, match="remat='x' is invalid"):
    mla_jax.Transformer(LONG, remat="x").init(jax.random.key(0), np.zeros((1, 4), np.int32))
