"""Self-speculative decoding: the model's own MTP module (mla_jax/mtp.py) drafts k tokens, the
model verifies them in one multi-token step over its latent cache.

A round (speculative_round), for every row holding n tokens in the cache, its last committed
token t_n (not yet in the cache) and k drafts d_1 .. d_k drawn from distributions q_1 .. q_k:

  verify   the model runs [t_n, d_1, .., d_k] after its n cached tokens as one T = k+1
           flash-decoding step: p_0 .. p_k, p_j the distribution of the token after input j
           (the row's sampler applied: temperature, top-k, top-p; greedy = one-hot at argmax).
  accept   the speculative sampling rule (Leviathan et al. 2023; Chen et al. 2023): d_j is kept
           with probability min(1, p_{j-1}(d_j) / q_j(d_j)) while all before it were; at the
           first refusal the next token is drawn from norm(max(0, p_{j-1} - q_j)), after the
           last kept draft from p_a. The tokens follow p exactly; with greedy's one-hot p and q
           it keeps d_j iff d_j = argmax p_{j-1} and the next token is argmax p_a: exactly plain
           greedy decoding. The a kept drafts and that token are committed: the cache keeps
           their a + 1 entries (lengths n + a + 1) and the refused drafts' slots are released by
           `lengths` alone; nothing is erased, the next round writes over them.
  catch up the MTP module runs over the committed positions n .. n + a, fed the model's hidden
           states there (from the verify step) and the committed tokens t_{n+1} .. t_{n+a+1}:
           its own one-layer cache then holds exactly the committed positions, like the model's.
  draft    its output at position n + a drafts d'_1; d'_2 .. d'_k come from applying the module
           again one position further each time, fed its own previous output as the hidden
           state (the model's is not known yet), as vLLM and SGLang draft several tokens with
           DeepSeek-V3's one MTP layer. Those entries are released by resetting the module's
           lengths: the next round's catch-up overwrites them with the model's.

Rows are ragged: `verified` [B] says how many of the k+1 inputs a row verifies (a row near its
end verifies only the drafts it can use; 0 for a finished row). Only the first MTP module drafts
(DeepSeek's checkpoints have one); deeper modules are a training signal.

generate(..., speculative=k) runs the prompt through the model and the MTP module (which drafts
the first k) and then rounds in one jax.lax.while_loop until every row has max_new_tokens or its
EOS: no host round trip per token or per round. The serving engine runs one round per step
over its paged cache (mla_jax/serving/runner.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax.cache import Cache
from mla_jax.kinds import absorbed_weights, init_cache, init_layer_cache
from mla_jax.layers.masking import prefill_attn_impl
from mla_jax.model import _hidden, output_logits
from mla_jax.mtp import check_depth, mtp_logits, mtp_step
from mla_jax.paged_cache import PagedCache
from mla_jax.sampling import DECODE_ATTN_IMPL, Sampler, _is_integer

AnyCache = Union[Cache, PagedCache]


@dataclasses.dataclass(frozen=True)
class RowSampling:
  """Each row's sampler, as data: temperature [B] (0 = greedy), top_k [B] int (0 = off), top_p
  [B] (1 = off); mla_jax.sampling.Sampler's semantics row by row (top-k, then top-p over what
  top-k kept). greedy (static): every row is greedy, so the rounds skip the distributions and
  compare argmaxes (the same tokens, fewer operations per step)."""

  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  greedy: bool = False

  @classmethod
  def of(cls, sampler: Sampler, batch: int) -> "RowSampling":
    """One Sampler's settings for every row."""
    return cls(jnp.full((batch,), sampler.temperature, jnp.float32),
               jnp.full((batch,), sampler.top_k or 0, jnp.int32),
               jnp.full((batch,), 1.0 if sampler.top_p is None else sampler.top_p, jnp.float32),
               greedy=sampler.temperature == 0.0)


jax.tree_util.register_dataclass(RowSampling, ["temperature", "top_k", "top_p"], ["greedy"])


def masked_row_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
                      top_p: jax.Array) -> jax.Array:
  """logits [R,V] divided by each row's temperature (1 where it is 0), with the tokens outside
  the row's top_k (0 = off) and then its top_p (1 = off) set to the lowest float32: what a
  sampling row draws from. float32 [R,V]."""
  logits = logits.astype(jnp.float32)
  v = logits.shape[-1]
  lowest = jnp.finfo(jnp.float32).min
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  ordered = -jnp.sort(-scaled, axis=-1)  # [R,V] most likely first
  k = jnp.where(top_k > 0, top_k, v)
  rank = jnp.arange(v)[None, :]
  ordered = jnp.where(rank < k[:, None], ordered, lowest)  # top-k kept
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
  kept = (rank < k[:, None]) & (before < top_p[:, None])  # top-1 always kept
  threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1)  # the least kept logit
  return jnp.where(scaled >= threshold[:, None], scaled, lowest)


def row_distributions(logits: jax.Array, sampling: RowSampling) -> jax.Array:
  """logits [B,...,V] -> the distributions each row draws from, [B,...,V] float32: a greedy
  row's is one-hot at the argmax (the first, on ties, as argmax picks)."""
  shape = logits.shape
  flat = logits.reshape(shape[0], -1, shape[-1])  # [B,M,V]
  m = flat.shape[1]
  rows = lambda x: jnp.repeat(x, m)  # noqa: E731  the row's setting for each of its M
  masked = masked_row_logits(flat.reshape(-1, shape[-1]), rows(sampling.temperature),
                             rows(sampling.top_k), rows(sampling.top_p))
  greedy = jax.nn.one_hot(jnp.argmax(flat.reshape(-1, shape[-1]), axis=-1), shape[-1])
  probs = jnp.where(rows(sampling.temperature)[:, None] > 0, jax.nn.softmax(masked, axis=-1),
                    greedy)
  return probs.reshape(shape)


def _draft_token(logits: jax.Array, sampling: RowSampling, keys: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """A draft per row from the MTP module's logits [B,V] and what it was drawn from ([B,V], or
  [B,0] when every row is greedy: the argmax needs none)."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.zeros(logits.shape[:1] + (0,))
  q = row_distributions(logits, sampling)
  return draw(q, keys), q


def accept_greedy(logits: jax.Array, drafts: jax.Array, verified: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """accept for rows that are all greedy, from the verify step's logits [B,k+1,V]: d_j is kept
  while it equals argmax p_{j-1}; the next token is argmax p_a."""
  k = drafts.shape[1]
  target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B,k+1]
  keep = (drafts == target[:, :k]) & (jnp.arange(1, k + 1)[None, :] < verified[:, None])
  kept = jnp.sum(jnp.cumprod(keep, axis=1), axis=1)
  return kept, jnp.take_along_axis(target, kept[:, None], axis=1)[:, 0]


def draw(probs: jax.Array, keys: jax.Array) -> jax.Array:
  """One token per row from probs [B,V] with its own key (keys [B]): int32 [B]. One-hot rows
  give their one token."""
  return jax.vmap(lambda key, p: jax.random.categorical(key, jnp.log(p)))(keys, probs).astype(
      jnp.int32)


def accept(p: jax.Array, drafts: jax.Array, q: jax.Array, verified: jax.Array,
           keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The speculative sampling rule: p [B,k+1,V] (the model's, after inputs t_n, d_1 .. d_k),
  drafts [B,k], q [B,k,V] (what each draft was drawn from), verified [B] (the first verified
  inputs count; drafts past verified - 1 are never kept), keys [B] -> (kept drafts a [B], the
  token after them [B])."""
  b, k = drafts.shape
  accept_keys, next_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
  p_draft = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=2)[..., 0]  # [B,k]
  q_draft = jnp.take_along_axis(q, drafts[..., None], axis=2)[..., 0]
  u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(accept_keys)  # [B,k]
  usable = jnp.arange(1, k + 1)[None, :] < verified[:, None]
  keep = (u * q_draft < p_draft) & usable  # with probability min(1, p / q)
  kept = jnp.sum(jnp.cumprod(keep, axis=1), axis=1)  # the longest kept prefix
  p_next = jnp.take_along_axis(p, kept[:, None, None], axis=1)[:, 0]  # [B,V]
  q_next = jnp.take_along_axis(q, jnp.minimum(kept, k - 1)[:, None, None], axis=1)[:, 0]
  residual = jnp.maximum(p_next - q_next, 0.0)
  refused = (kept + 1 < verified) & (jnp.sum(residual, axis=-1) > 0)  # draft a + 1 was refused
  return kept, draw(jnp.where(refused[:, None], residual, p_next), next_keys)


def catch_up_and_draft(cfg, params, absorbed: dict, mtp_cache: AnyCache, hidden: jax.Array,
                       tokens: jax.Array, counts: jax.Array, sampling: RowSampling, k: int,
                       keys: jax.Array, attn_impl: str = DECODE_ATTN_IMPL
                       ) -> tuple[AnyCache, jax.Array, jax.Array]:
  """The MTP module over counts [B] new committed positions (hidden [B,T,D] the model's hidden
  states there, tokens [B,T] the committed token after each), then k drafts per row from its
  output at the last of them (keys [B]). Returns (the MTP cache holding the committed positions,
  drafts [B,k], the distributions they were drawn from [B,k,V], or [B,k,0] when every row is
  greedy)."""
  mtp_absorbed = absorbed.get("mtp_layers_0", {}).get("self_attn")
  committed = mtp_cache.lengths + counts
  out, mtp_cache, _ = mtp_step(cfg, params, 0, hidden, tokens, mtp_cache, num_tokens=counts,
                               attn_impl=attn_impl, absorbed=mtp_absorbed)  # [B,T,D]
  h = jnp.take_along_axis(out, jnp.maximum(counts - 1, 0)[:, None, None], axis=1)  # [B,1,D]
  draft_keys = jax.vmap(lambda key: jax.random.split(key, k))(keys)  # [B,k]
  drafts, probs = [], []
  for j in range(k):
    if j:  # one position further, fed the module's own output; never past the cache's end
      room = (mtp_cache.lengths < mtp_cache.max_len).astype(jnp.int32)
      h, mtp_cache, _ = mtp_step(cfg, params, 0, h, drafts[-1][:, None], mtp_cache,
                                 num_tokens=room, attn_impl=DECODE_ATTN_IMPL,
                                 absorbed=mtp_absorbed)
    token, q = _draft_token(mtp_logits(cfg, params, 0, h, decoding=True)[:, 0], sampling,
                            draft_keys[:, j])
    drafts.append(token)
    probs.append(q)
  mtp_cache = mtp_cache.replace(lengths=committed)  # the drafts' entries released
  return mtp_cache, jnp.stack(drafts, axis=1), jnp.stack(probs, axis=1)


def speculative_round(cfg, params, absorbed: dict, cache: AnyCache, mtp_cache: AnyCache,
                      last: jax.Array, drafts: jax.Array, q: jax.Array, verified: jax.Array,
                      sampling: RowSampling, keys: jax.Array):
  """One round over rows whose cache and MTP cache both hold their n committed tokens: last [B]
  (t_n), drafts [B,k] and q [B,k,V] (their distributions), verified [B] in [0, k+1], keys [B]
  (the rows' keys for this round). Returns (cache, MTP cache, both holding n + count tokens;
  kept [B]; committed [B,k+1]: d_1 .. d_a then the next token; count [B] = kept + 1, 0 where
  verified is 0; the next drafts [B,k] and their distributions)."""
  k = drafts.shape[1]
  accept_keys, draft_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
  inputs = jnp.concatenate([last[:, None], drafts], axis=1)  # [B,k+1]
  n = cache.lengths
  hidden, cache, _ = _hidden(cfg, params, inputs, cache, DECODE_ATTN_IMPL, verified, "none",
                             absorbed)  # [B,k+1,D]: one step over the latent cache
  logits = output_logits(cfg, params, hidden, decoding=True)  # [B,k+1,V]
  if sampling.greedy:
    kept, nxt = accept_greedy(logits, drafts, verified)
  else:
    kept, nxt = accept(row_distributions(logits, sampling), drafts, q, verified, accept_keys)
  slots = jnp.arange(k + 1)[None, :]
  committed = jnp.where(slots < kept[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])
  count = jnp.where(verified > 0, kept + 1, 0)
  cache = cache.replace(lengths=n + count)  # the refused drafts' slots released
  mtp_cache, drafts, q = catch_up_and_draft(cfg, params, absorbed, mtp_cache, hidden, committed,
                                            count, sampling, k, draft_keys)
  return cache, mtp_cache, kept, committed, count, drafts, q


@dataclasses.dataclass(frozen=True)
class SpeculativeStats:
  """What a speculative generation did (host values).

  rounds: verify steps the loop ran (each over the whole batch); row_rounds: the rows' verify
  steps in all (a row counts while it still generates); new_tokens: tokens generated, the
  prefill's first ones included; reached [k]: drafts at position j that were verified with every
  draft before them kept; accepted [k]: of those, the ones kept."""

  rounds: int
  row_rounds: int
  new_tokens: int
  reached: np.ndarray
  accepted: np.ndarray

  @property
  def acceptance(self) -> np.ndarray:
    """accepted / reached per draft position [k] (nan where none was reached): at position 1,
    the rate the DeepSeek-V3 report gives for its second token (85-90%)."""
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.where(self.reached > 0, self.accepted / np.maximum(self.reached, 1), np.nan)

  @property
  def tokens_per_round(self) -> float:
    """Tokens a row commits per verify step on average (its kept drafts + 1)."""
    return float(self.accepted.sum() + self.row_rounds) / max(self.row_rounds, 1)


def check_speculative(config, speculative) -> None:
  """Raises ValueError unless speculative is a positive integer and the model has an MTP module
  to draft with."""
  if not _is_integer(speculative) or speculative < 1:
    raise ValueError(f"speculative={speculative!r} is invalid: must be a positive integer (the "
                     "tokens the MTP module drafts per verify step), or 0 for plain decoding")
  check_depth(config, 0)


@functools.partial(jax.jit, static_argnames=("model", "max_len", "sampler", "k"))
def _prefill(params, prompt: jax.Array, lengths: jax.Array, key: jax.Array, draft_key: jax.Array,
             *, model, max_len: int, sampler: Sampler, k: int):
  """The prompt through the model (on generate's prefill path, prefill_attn_impl: the same
  first token) and through the MTP module, which drafts k tokens. -> (first [B], cache, MTP
  cache, drafts [B,k], their distributions)."""
  cfg = model.config
  b = prompt.shape[0]
  cache = init_cache(cfg, b, max_len)
  impl = prefill_attn_impl(prompt.shape[1])
  hidden, cache, _ = _hidden(cfg, params, prompt, cache, impl, lengths, "none", None)
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B,1,D]
  first = sampler(output_logits(cfg, params, last, decoding=True)[:, 0], key)
  # The MTP module at position i reads t_{i+1}: the prompt shifted left, then the first token.
  shifted = jnp.concatenate([prompt[:, 1:], prompt[:, :1]], axis=1)
  tokens = jnp.where(jnp.arange(prompt.shape[1])[None, :] == (lengths - 1)[:, None],
                     first[:, None], shifted)
  mtp_cache = Cache(layers=(init_layer_cache(cfg, b, max_len),),
                    lengths=jnp.zeros((b,), jnp.int32))
  mtp_cache, drafts, q = catch_up_and_draft(cfg, params, {}, mtp_cache, hidden, tokens, lengths,
                                            RowSampling.of(sampler, b), k,
                                            jax.random.split(draft_key, b), impl)
  return first, cache, mtp_cache, drafts, q


@functools.partial(jax.jit, static_argnames=("model", "sampler", "max_new_tokens", "eos_id",
                                             "pad_id"),
                   donate_argnames=("cache", "mtp_cache"))
def _decode_loop(params, first, cache: Cache, mtp_cache: Cache, drafts, q, key, *, model,
                 sampler: Sampler, max_new_tokens: int, eos_id: Optional[int], pad_id: int):
  """Rounds until every row has max_new_tokens or its EOS: (new tokens [B, max_new_tokens],
  pad_id after an EOS; tokens generated [B]; counts: rounds, row_rounds, reached [k],
  accepted [k]; the caches, returned so the donated buffers are updated in place)."""
  cfg = model.config
  (b, k), n_max = drafts.shape, max_new_tokens
  absorbed = absorbed_weights(cfg, params)
  sampling = RowSampling.of(sampler, b)
  width = n_max + k + 1  # committed tokens land below n_max; the rest is room to drop into
  slots = jnp.arange(k + 1)[None, :]  # [1,k+1]

  def live(state) -> jax.Array:
    return ~state["done"] & (state["generated"] < n_max)

  def round_(state):
    rows = live(state)
    verified = jnp.where(rows, jnp.minimum(k + 1, n_max - state["generated"]), 0)  # [B]
    keys = jax.random.split(jax.random.fold_in(key, state["rounds"]), b)
    cache, mtp_cache, kept, committed, count, drafts, q = speculative_round(
        cfg, params, absorbed, state["cache"], state["mtp_cache"], state["last"],
        state["drafts"], state["q"], verified, sampling, keys)
    shown, done = count, state["done"]
    if eos_id is not None:  # the row ends at its first EOS among the committed tokens
      is_eos = (committed == eos_id) & (slots < count[:, None])
      shown = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, count)
      done = done | is_eos.any(axis=1)
    columns = jnp.where(slots < shown[:, None], state["generated"][:, None] + slots, width)
    position = slots[:, :k]  # [1,k]: draft j + 1
    reached = rows[:, None] & (position <= kept[:, None]) & (position + 1 < verified[:, None])
    last = jnp.take_along_axis(committed, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    return {"cache": cache, "mtp_cache": mtp_cache, "drafts": drafts, "q": q,
            "last": jnp.where(rows, last, state["last"]),
            "out": state["out"].at[jnp.arange(b)[:, None], columns].set(committed, mode="drop"),
            "generated": state["generated"] + shown, "done": done,
            "rounds": state["rounds"] + 1, "row_rounds": state["row_rounds"] + rows.sum(),
            "reached": state["reached"] + reached.sum(axis=0),
            "accepted": state["accepted"] + (rows[:, None] & (position < kept[:, None])).sum(0)}

  state = {"cache": cache, "mtp_cache": mtp_cache, "drafts": drafts, "q": q, "last": first,
           "out": jnp.full((b, width), pad_id, jnp.int32).at[:, 0].set(first),
           "generated": jnp.ones((b,), jnp.int32),
           "done": jnp.zeros((b,), bool) if eos_id is None else first == eos_id,
           "rounds": jnp.int32(0), "row_rounds": jnp.int32(0),
           "reached": jnp.zeros((k,), jnp.int32), "accepted": jnp.zeros((k,), jnp.int32)}
  state = jax.lax.while_loop(lambda s: jnp.any(live(s)), round_, state)
  counts = {name: state[name] for name in ("rounds", "row_rounds", "reached", "accepted")}
  return (state["out"][:, :n_max], state["generated"], counts, state["cache"],
          state["mtp_cache"])


def speculative_decode(model, params, padded: np.ndarray, prompt_lengths: np.ndarray, *,
                       max_len: int, max_new_tokens: int, sampler: Sampler, k: int,
                       eos_id: Optional[int], pad_id: int, seed: int
                       ) -> tuple[np.ndarray, SpeculativeStats]:
  """The compiled prefill and loop on inputs mla_jax.sampling.generate has checked: padded [B,P]
  int32 prompts padded on the right, prompt_lengths [B], max_len the caches' slots ->
  (new tokens [B, max_new_tokens], pad_id after an EOS; the run's SpeculativeStats)."""
  check_speculative(model.config, k)
  key = jax.random.key(seed)
  first_key = jax.random.split(key, max_new_tokens)[0]  # plain generate's key of the first token
  draft_key, loop_key = jax.random.split(jax.random.fold_in(key, 1))
  first, cache, mtp_cache, drafts, q = _prefill(
      params, jnp.asarray(padded), jnp.asarray(prompt_lengths), first_key, draft_key,
      model=model, max_len=max_len, sampler=sampler, k=k)
  new, generated, counts, _, _ = _decode_loop(
      params, first, cache, mtp_cache, drafts, q, loop_key, model=model, sampler=sampler,
      max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
  counts = jax.device_get(counts)
  stats = SpeculativeStats(int(counts["rounds"]), int(counts["row_rounds"]),
                           int(np.sum(jax.device_get(generated))), np.asarray(counts["reached"]),
                           np.asarray(counts["accepted"]))
  return np.asarray(new), stats
