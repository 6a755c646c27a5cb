"""`bench serve --quick`: every requested token delivered on every path, the pool sized by the
budget, the ratios against MHA and padded generate, the roofline's arithmetic, and the drivers'
bookkeeping on known inputs."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.bench import serve
from mla_jax.bench.common import Ceilings
from mla_jax.bench.workload import Request, Workload
from mla_jax.kinds import init_cache
from mla_jax.model import Transformer

from tests.bench.helpers import check_header, rows, run_suite
from tests.helpers import TINY_CONFIGS, variant


def test_every_token_is_delivered_and_ratios_are_against_mha(tmp_path):
  raw = run_suite("serve", tmp_path, "--variants", "MLA,MLA int8,MHA", "--repeats", "2")
  burst, poisson, pages = raw["tables"]
  assert burst["title"].startswith("All requests at once")
  rate = 0.75 * burst["rows"][0]["requests_per_s"]
  assert poisson["title"].startswith(f"Poisson arrivals, {rate:,.3g} requests/s")
  output_tokens = int(re.search(r"([0-9,]+) output tokens", burst["notes"][0]).group(1)
                      .replace(",", ""))
  for table in (burst, poisson, pages):
    for row in table["rows"]:
      assert row["output_tokens"] == output_tokens  # every request got all its tokens
      assert row["requests_per_s"] * row["seconds"] == pytest.approx(24)
      assert row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
      assert 0 < row["ttft_p50"] <= row["ttft_p99"]
      if row["path"] == "engine":
        assert 0 < row["of_roofline"] <= 1 and row["bound"] in ("memory", "compute")
        assert row["held_peak"] <= min(row["max_seqs"], 24)
        assert row["decode_tokens"] + 24 >= output_tokens  # the first token comes from prefill
  for table in (burst, poisson):
    mla, padded, int8, mha = table["rows"]
    assert [(r["variant"], r["path"]) for r in table["rows"]] == [
        ("MLA", "engine"), ("MLA", "padded generate"), ("MLA int8", "engine"), ("MHA", "engine")]
    # quick model, float32: MLA caches 32 + 8 values, int8 32 bytes + a float32 scale + 8
    # bfloat16 RoPE values, MHA 4 heads x (24 + 16)
    assert (mla["bytes_per_token"], int8["bytes_per_token"], mha["bytes_per_token"]) == (
        160, 52, 640)
    for row in (mla, int8, mha):
      assert row["num_pages"] == 96 * 1024 // (row["bytes_per_token"] * 4)
      assert row["runs"] == 2
    assert mha["vs_mha"] == 1 and mla["vs_mha"] == pytest.approx(
        mla["tokens_per_s"] / mha["tokens_per_s"])
    assert padded["itl_p50"] is None and padded["batches"] >= 2
  assert "the aim is >= 3.60x" in " ".join(burst["notes"])  # 0.9 x 640 / 160
  assert "the aim is" not in " ".join(poisson["notes"])  # held follows arrivals there
  assert [r["page_size"] for r in pages["rows"]] == [4, 8]
  assert "5.76x" in raw["markdown"] and "MLA engine / padded generate" in raw["markdown"]
  check_header(raw, "serve")


def test_summarize_on_a_known_run():
  log = serve.RunLog(served=[serve.Served(0.0, [1.0, 1.5, 3.0]), serve.Served(0.5, [2.5])],
                     held=[(1.0, 2), (3.0, 1)], duration_s=4.0, counters={"preemptions": 1})
  row = serve.summarize(log)
  assert row["requests_per_s"] == 0.5 and row["tokens_per_s"] == 1.0
  assert row["ttft_p50"] == 1.5 and row["ttft_p99"] == pytest.approx(1.0 + 0.99 * 1.0)
  assert row["itl_p50"] == 1.0 and row["itl_p99"] == pytest.approx(0.5 + 0.99 * 1.0)
  assert row["held_mean"] == pytest.approx((1.0 * 2 + 3.0 * 1) / 4.0) and row["held_peak"] == 2
  batch = serve.RunLog([serve.Served(0.0, [2.0, 2.0])], [(2.0, 1)], 2.0, {})
  assert serve.summarize(batch)["itl_p50"] is None  # a whole batch at once: no ITL


def test_the_roofline_counts_the_workload():
  cfg = variant(TINY_CONFIGS["no_q_lora_odd_heads"], num_layers=2)
  workload = Workload((Request((1, 2, 3), 2, 0.0), Request((4,), 3, 0.0)), "two")
  counters = {"prefill_tokens": 4, "decode_tokens": 3, "decode_runs": 3, "prefill_runs": 1}
  ceilings = Ceilings(copy_bytes_per_s=1e9, matmul_flops_per_s=1e9, copy_mib=1, matmul_n=1,
                      dtype="float32")
  roof = serve.engine_roofline(cfg, workload, counters, ceilings)
  params = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  total = sum(x.size for x in jax.tree_util.tree_leaves(params))
  matmul = total - cfg.vocab_size * cfg.hidden_size
  # positions attended: prompt 1: 1+2+3, decode at 4; prompt 2: 1, decode at 2 and 3
  attended = (1 + 2 + 3 + 4) + (1 + 2 + 3)
  per_position = 2 * cfg.num_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
  assert roof["flops"] == 2 * matmul * 7 + per_position * attended
  layer = init_cache(cfg, 1, 1).layers[0]
  token_bytes = 2 * sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(layer))
  assert roof["bytes"] == total * 4 * 4 + token_bytes * (4 + 2 + 3)
  assert roof["roofline_s"] == max(roof["bytes"], roof["flops"]) / 1e9
  assert roof["bound"] == ("compute" if roof["flops"] > roof["bytes"] else "memory")


def test_padded_batches_are_first_come_first_served_within_the_budget(monkeypatch):
  cfg = variant(TINY_CONFIGS["no_q_lora_odd_heads"], max_seq_len=64)
  model = Transformer(cfg)
  one_slot = sum(x.size * x.dtype.itemsize
                 for x in jax.tree_util.tree_leaves(jax.eval_shape(lambda: init_cache(cfg, 1, 1)))
                 if x.ndim > 1)
  requests = [Request(tuple(range(1, p + 1)), m, 0.0)
              for p, m in ((4, 4), (2, 2), (10, 6), (3, 1), (1, 1))]
  batches = []

  def fake_generate(model, params, prompts, *, max_new_tokens):
    batches.append((len(prompts), max(len(p) for p in prompts) + max_new_tokens))
    return np.zeros((len(prompts), 1), np.int32)

  monkeypatch.setattr(serve, "generate", fake_generate)
  budget = 2 * serve.nbytes(jax.eval_shape(lambda: init_cache(cfg, 1, 16)))
  log = serve.drive_padded(model, None, Workload(tuple(requests), "five"), budget)
  # rows of 8 slots fit twice; adding the 16-slot request would need 3 x 16 slots
  assert batches == [(2, 8), (2, 16), (1, 2)]
  assert [len(s.token_s) for s in log.served] == [4, 2, 6, 1, 1]
  assert one_slot > 0 and all(rows * length * one_slot <= budget for rows, length in batches)


@pytest.mark.parametrize("flags, message", [
    (["--budget", "2KiB"], "--budget 2KiB is too small for MLA: its longest request (37 tokens) "
                        "needs 10 pages of 4 tokens and the budget holds 3; give a larger --budget"),
    (["--arrivals", "burst,steady"], "--arrivals 'burst,steady' is invalid: choose from burst, "
                                     "poisson"),
    (["--rate", "-3"], "--rate '-3' is invalid: a positive number of requests/s, or auto"),
    (["--max-seqs", "0"], "--max-seqs 0 is invalid: must be >= 1"),
])
def test_bad_options_are_one_line(flags, message, tmp_path, capsys):
  from mla_jax.cli import main

  assert main(["bench", "serve", "--quick", "--out", str(tmp_path), "--variants", "MLA",
               "--page-sizes", "none", *flags]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"mla-jax: error: {message}") and "\n" not in err
