"""`mla-jax bench peers`: mla-jax against the peer users compare it with, Hugging Face
transformers' DeepseekV2 (PyTorch on the CPU, its default `sdpa` attention), on one checkpoint.

The checkpoint: a random DeepseekV2 model made by transformers (DeepSeek-V2-Lite's attention
shapes: hidden 2048, 16 heads, no query compression, latent 512 + RoPE key 64, heads of
128 + 64 / 128, YaRN; --layers dense layers with the MLP width 1408; a byte vocabulary of
260), saved with save_pretrained and loaded into mla-jax with `load_hf`: the same weights on
both sides. The logits of the two prefills are compared, so a row compares the same function.

Two workloads, float32, each side on --threads CPU threads (torch.set_num_threads; XLA's CPU
client uses the cores it is given):

  prefill   one prompt of --prefill-tokens tokens into an empty cache, logits of every position:
            transformers' forward with use_cache=True under inference_mode, and mla-jax's
            jitted forward into a latent cache (init_cache; generate's prefill path:
            layers.masking.prefill_attn_impl);
  training  one AdamW step (gradient clipped to norm 1) on a --train-batch x --train-seq-len
            batch of next-token cross-entropy: torch.optim.AdamW after loss.backward(), and
            mla-jax's Trainer.train_step (its compiled program, state donated).

Runs are interleaved (one call of each side in turn, --repeats times, after one untimed call
each: compilation and first-touch), so a change in the machine's load hits both sides alike;
the table gives median, min and max, and the ratio of medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax.bench import add_quick_option
from mla_jax.bench.common import (Report, Table, base_config, header_lines, progress,
                                  time_interleaved)
from mla_jax.config.model import ModelConfig
from mla_jax.config.run import Config, TrainConfig
from mla_jax.layers.masking import prefill_attn_impl

INSTALL = 'pip install torch==2.13.0 "transformers>=5.24,<6"'


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--layers", type=int, default=2, help="dense decoder layers")
  add_quick_option(parser, "--prefill-tokens", full=2048, quick=64, type=int,
                   help="prompt length of the prefill")
  add_quick_option(parser, "--train-batch", full=4, quick=2, type=int,
                   help="sequences per training step")
  add_quick_option(parser, "--train-seq-len", full=512, quick=32, type=int,
                   help="tokens per training sequence")
  add_quick_option(parser, "--repeats", full=7, quick=2, type=int,
                   help="timed calls of each side per workload, interleaved")
  parser.add_argument("--threads", type=int, default=2,
                      help="CPU threads for PyTorch (torch.set_num_threads); run the command "
                           "where JAX sees as many cores (default: %(default)s)")


def _check(args: argparse.Namespace) -> None:
  for name in ("layers", "prefill_tokens", "train_batch", "train_seq_len", "repeats", "threads"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: must be >= 1")


def hf_config(model: ModelConfig):
  """The transformers DeepseekV2Config of a dense mla-jax ModelConfig (inverse of
  mla_jax.hf.model_config_from_hf for the fields it reads)."""
  import transformers

  rope = {"rope_type": "default", "rope_theta": model.rope_theta}
  if model.rope_scaling is not None:
    rope = {**rope, "rope_type": "yarn", **dataclasses.asdict(model.rope_scaling)}
  config = transformers.DeepseekV2Config(
      vocab_size=model.vocab_size, hidden_size=model.hidden_size,
      intermediate_size=model.intermediate_size, num_hidden_layers=model.num_layers,
      num_attention_heads=model.num_heads, num_key_value_heads=model.num_heads,
      q_lora_rank=model.q_lora_rank, kv_lora_rank=model.kv_lora_rank,
      qk_nope_head_dim=model.qk_nope_head_dim, qk_rope_head_dim=model.qk_rope_head_dim,
      v_head_dim=model.v_head_dim, first_k_dense_replace=model.num_layers,  # every layer dense
      rope_interleave=model.rope_interleave, rope_parameters=rope,
      max_position_embeddings=model.max_seq_len, rms_norm_eps=model.rms_norm_eps,
      tie_word_embeddings=False)
  config._attn_implementation = "sdpa"  # transformers' default attention on CPU
  return config


def _summary(timing) -> tuple[float, float, float]:
  return timing.median_s * 1e3, timing.min_s * 1e3, timing.max_s * 1e3


def run(args: argparse.Namespace) -> Report:
  _check(args)
  try:
    import torch
    import transformers
  except ImportError:
    raise ValueError(f"bench peers needs PyTorch and transformers: {INSTALL}") from None
  from mla_jax.hf import load_hf
  from mla_jax.kinds import init_cache
  from mla_jax.train.step import TrainState, Trainer

  torch.set_num_threads(args.threads)
  args.dtype = "float32"
  longest = max(args.prefill_tokens, args.train_seq_len)
  model_cfg = base_config(args, longest)
  progress(f"a random transformers DeepseekV2 checkpoint ({args.layers} layers), loaded by both")
  torch.manual_seed(0)
  hf_model = transformers.DeepseekV2ForCausalLM(hf_config(model_cfg)).eval()
  with tempfile.TemporaryDirectory() as directory:
    hf_model.save_pretrained(directory)
    model, params = load_hf(directory)
  params = jax.device_put(params)
  rng = np.random.default_rng(0)

  # Prefill: every position's logits, and the cache.
  prompt = rng.integers(0, model_cfg.vocab_size, (1, args.prefill_tokens))
  prompt_jax, prompt_torch = jnp.asarray(prompt, jnp.int32), torch.as_tensor(prompt)
  impl = prefill_attn_impl(args.prefill_tokens)

  @jax.jit
  def prefill(params, tokens):
    cache = init_cache(model.config, 1, args.prefill_tokens)
    return model.apply({"params": params}, tokens, cache=cache, attn_impl=impl)

  progress(f"compiling mla-jax's prefill of {args.prefill_tokens:,} tokens ({impl})")
  ours_logits = np.asarray(prefill(params, prompt_jax)[0])
  with torch.inference_mode():
    theirs_logits = hf_model(prompt_torch, use_cache=True).logits.numpy()
  agreement = float(np.max(np.abs(ours_logits - theirs_logits)) / np.max(np.abs(theirs_logits)))

  def hf_prefill():
    with torch.inference_mode():
      return hf_model(prompt_torch, use_cache=True).logits  # computed once it returns

  progress(f"prefill, {args.repeats} interleaved calls each")
  prefill_times = time_interleaved(
      {"transformers": hf_prefill, "mla-jax": lambda: prefill(params, prompt_jax)}, args.repeats)

  # Training: one AdamW step with the gradient clipped to norm 1, same batch each step.
  b, t = args.train_batch, args.train_seq_len
  batch = rng.integers(0, model_cfg.vocab_size, (b, t + 1))
  config = Config(model=model.config, train=TrainConfig(batch_size=b, seq_len=t, steps=10**6,
                                                        warmup_steps=0))
  trainer = Trainer.build(config, devices=jax.devices()[:1])
  progress(f"compiling mla-jax's training step of {b} x {t} tokens "
           f"({prefill_attn_impl(t)} attention)")
  trainer.compile_train_step()
  state = {"state": jax.device_put(
      TrainState(step=jnp.int32(0), params=params, opt_state=trainer.optimizer.init(params)),
      trainer.state_shardings)}
  inputs, targets = trainer.put_batch(batch[:, :-1], batch[:, 1:])

  def ours_step():
    state["state"], metrics = trainer.train_step(state["state"], inputs, targets)
    return metrics["loss"]

  hf_model.train()
  optimizer = torch.optim.AdamW(hf_model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                weight_decay=0.1)
  hf_batch = torch.as_tensor(batch[:, :-1])

  def hf_step():
    optimizer.zero_grad(set_to_none=True)
    loss = hf_model(hf_batch, labels=hf_batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
    optimizer.step()
    return None  # PyTorch on the CPU has finished when the call returns

  progress(f"training step, {args.repeats} interleaved calls each")
  train_times = time_interleaved({"transformers": hf_step, "mla-jax": ours_step}, args.repeats)

  rows = []
  for workload, times, shape in (("prefill", prefill_times, f"1 x {args.prefill_tokens:,}"),
                                 ("training step", train_times, f"{b} x {t:,}")):
    theirs, ours = _summary(times["transformers"]), _summary(times["mla-jax"])
    rows.append({"workload": workload, "tokens": shape,
                 "hf_ms": theirs[0], "hf_min": theirs[1], "hf_max": theirs[2],
                 "ours_ms": ours[0], "ours_min": ours[1], "ours_max": ours[2],
                 "hf_over_ours": theirs[0] / ours[0]})
  columns = (("workload", "workload"), ("tokens", "tokens"),
             ("hf_ms", "transformers ms (median)"), ("hf_min", "min"), ("hf_max", "max"),
             ("ours_ms", "mla-jax ms (median)"), ("ours_min", "min"), ("ours_max", "max"),
             ("hf_over_ours", "transformers time / mla-jax time"))
  notes = [
      f"transformers {transformers.__version__} (DeepseekV2, sdpa attention) on PyTorch "
      f"{torch.__version__} with {args.threads} threads; mla-jax's prefill runs {impl} "
      f"attention, its training step {prefill_attn_impl(t)} (layers.masking).",
      f"Same checkpoint: the prefill logits agree to {agreement:.1e} of their largest magnitude.",
      "A ratio above 1: mla-jax is faster. Calls interleaved, one of each side in turn, after "
      "one untimed call each (compilation apart)."]
  table = Table(f"mla-jax against transformers' DeepseekV2, {args.layers} dense layers of "
                "DeepSeek-V2-Lite's attention shapes, float32", columns, rows, notes)
  rows_for_plot = list(rows)
  return Report("peers", header_lines("float32", args.command), [table],
                plot=lambda png: plot(rows_for_plot, png))


def plot(rows: list[dict], path) -> None:
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4))
  x = np.arange(len(rows))
  for offset, key, label, color in ((-0.2, "hf", "transformers", "tab:gray"),
                                    (0.2, "ours", "mla-jax", "tab:red")):
    medians = [r[f"{key}_ms"] for r in rows]
    ax.bar(x + offset, medians, width=0.4, label=label, color=color,
           yerr=[[m - r[f"{key}_min"] for m, r in zip(medians, rows)],
                 [r[f"{key}_max"] - m for m, r in zip(medians, rows)]], capsize=4)
  ax.set_xticks(x, [f"{r['workload']}\n{r['tokens']} tokens" for r in rows])
  ax.set_ylabel("ms per call (median; bars: min..max)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
