"""On-device decode loops for GPT: greedy / sampling and beam search, one jit call per batch.

Prompts come left-padded (BxT ids, 1/0 attention mask): the prefill fills a KV cache of
T + max_new_tokens slots in one call, then `jax.lax.while_loop` feeds one token per row
per step until every row has produced eos_id or max_new_tokens tokens. Nothing returns
to the host in between.

Both loops return generated ids BxN (N = max_new_tokens); positions after a row's
end hold pad_id, and a row that stopped at end-of-text holds eos_id at its end.

Beam search follows Hugging Face's `generate(num_beams=K, do_sample=False)` with its
default early_stopping=False: 2K candidates per step, a finished hypothesis scores
sum(log p) / generated_length ** length_penalty (eos counted), only candidates ranked in
the top K may finish, and a prompt stops once its best running beam, scored at the
current length, cannot beat its worst of K finished hypotheses.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from plmjax.models import gpt

NEG = -1.0e9  # Hugging Face's "impossible" score


def filter_logits(logits_V, top_k: int, top_p):
  """-inf outside the top-k tokens and outside the smallest set with probability >= top_p."""
  neg = jnp.finfo(logits_V.dtype).min
  if top_k > 0:
    kth = jax.lax.top_k(logits_V, top_k)[0][-1]
    logits_V = jnp.where(logits_V < kth, neg, logits_V)
  sorted_V = jnp.sort(logits_V)[::-1]
  probs_V = jax.nn.softmax(sorted_V)
  # A token stays while the probability of the tokens ranked above it is below top_p
  # (so the most likely token always stays).
  before_V = jnp.cumsum(probs_V) - probs_V
  cutoff = jnp.min(jnp.where(before_V < top_p, sorted_V, jnp.inf))
  return jnp.where(logits_V < cutoff, neg, logits_V)


def batch_axes(make_cache):
  """Per cache leaf, the axis that holds the batch (None: shared by all rows);
  make_cache(b) builds the cache of b rows (only its shapes are computed)."""
  one, two = (jax.eval_shape(lambda b=b: make_cache(b)) for b in (1, 2))

  def axis(a, b):
    diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
    return diff[0] if diff else None
  return jax.tree.map(axis, one, two)


def take_rows(cache, axes, rows_R):
  """The cache of rows `rows_R` (a gather along each leaf's batch axis)."""
  return jax.tree.map(lambda x, a: x if a is None else jnp.take(x, rows_R, axis=a), cache, axes)


def _prefill(model, params, ids_BxT, mask_BxT, max_new: int):
  """Prompt through an empty cache; returns (last logits BxV, cache, next position B)."""
  batch, length = ids_BxT.shape
  cache = gpt.init_cache(model, batch, length + max_new)
  positions_BxT = jnp.maximum(jnp.cumsum(mask_BxT, axis=1) - 1, 0)
  out, mut = model.apply({"params": params, "cache": cache}, ids_BxT, attention_mask=mask_BxT,
                         position_ids=positions_BxT, decode=True, mutable=["cache"])
  return out["logits"][:, -1], mut["cache"], mask_BxT.sum(axis=1).astype(jnp.int32)


def _step(model, params, cache, tokens_R, positions_R):
  """One token per row through the cache; returns (logits RxV, cache)."""
  out, mut = model.apply({"params": params, "cache": cache}, tokens_R[:, None],
                         position_ids=positions_R[:, None], decode=True, mutable=["cache"])
  return out["logits"][:, -1], mut["cache"]


def sample_tokens(step, logits_BxV, cache, seed, rows_B, eos_id, pad_id, temperature, top_p, *,
                  max_new_tokens: int, greedy: bool, top_k: int):
  """Greedy (greedy=True) or sampled tokens BxN from the first logits and a cache;
  step(cache, token_B, i) feeds new token i - 1 and returns (logits BxV, cache). Row b draws
  from key(seed) folded with rows_B[b] (the prompt's index) and the step, so a prompt's
  sample does not depend on the rest of its batch."""
  batch = logits_BxV.shape[0]
  keys_B = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(rows_B)

  def pick(logits_BxV, i):
    if greedy:
      return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    def one(logits_V, key):
      logits_V = filter_logits(logits_V / temperature, top_k, top_p)
      return jax.random.categorical(jax.random.fold_in(key, i), logits_V)
    return jax.vmap(one)(logits_BxV.astype(jnp.float32), keys_B).astype(jnp.int32)

  def record(out_BxN, done_B, token_B, i):
    token_B = jnp.where(done_B, pad_id, token_B)
    return out_BxN.at[:, i].set(token_B), done_B | (token_B == eos_id), token_B

  out_BxN = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  out_BxN, done_B, token_B = record(out_BxN, jnp.zeros(batch, bool), pick(logits_BxV, 0), 0)

  def cond(state):
    i, _, _, done_B, _ = state
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def body(state):
    i, token_B, out_BxN, done_B, cache = state
    logits_BxV, cache = step(cache, token_B, i)
    out_BxN, done_B, token_B = record(out_BxN, done_B, pick(logits_BxV, i), i)
    return i + 1, token_B, out_BxN, done_B, cache

  state = (jnp.int32(1), token_B, out_BxN, done_B, cache)
  return jax.lax.while_loop(cond, body, state)[2]


def beam_tokens(step, reorder, logits_BxV, cache, eos_id, pad_id, penalty_N1, *,
                max_new_tokens: int, num_beams: int):
  """The best beam per prompt, BxN, from the first logits and a cache of B rows;
  step(cache, token_R, i) feeds new token i - 1 of each of the R = B x K beams and returns
  (logits RxV, cache); reorder(cache, rows_R) gathers the cache rows of the beams kept.
  penalty_N1[n] = n ** length_penalty (float32, computed on the host in float64 as Hugging
  Face does)."""
  batch, vocab = logits_BxV.shape
  k, n = num_beams, max_new_tokens
  k2 = 2 * k  # candidates kept per step: enough to leave K running if K of them end
  cache = reorder(cache, jnp.repeat(jnp.arange(batch), k))  # every beam starts from the prompt
  logits_RxV = jnp.repeat(logits_BxV, k, axis=0)

  def select(s, logits_RxV):
    """One step of Hugging Face's _beam_search: candidates, running beams, finished beams."""
    i = s["i"]
    logp_BxKxV = jax.nn.log_softmax(logits_RxV.astype(jnp.float32)).reshape(batch, k, vocab)
    logp_BxKV = (logp_BxKxV + s["run_scores"][:, :, None]).reshape(batch, k * vocab)
    cand_scores, flat = jax.lax.top_k(logp_BxKV, k2)
    cand_beam, cand_tok = flat // vocab, (flat % vocab).astype(jnp.int32)
    cand_seqs = jnp.take_along_axis(s["run_seqs"], cand_beam[:, :, None], axis=1)
    cand_seqs = cand_seqs.at[:, :, i].set(cand_tok)
    hits = (cand_tok == eos_id) | (i + 1 >= n)
    # Running: the best K candidates that did not end.
    run_scores, keep = jax.lax.top_k(cand_scores + hits * NEG, k)
    run_seqs = jnp.take_along_axis(cand_seqs, keep[:, :, None], axis=1)
    parent = jnp.take_along_axis(cand_beam, keep, axis=1) + jnp.arange(batch)[:, None] * k
    # Finished: candidates among the top K that ended, while the prompt may still improve.
    ended = hits & (jnp.arange(k2) < k)[None, :]
    fin = cand_scores / penalty_N1[i + 1]
    fin += (~s["open"])[:, None] * NEG
    fin += (~ended) * NEG
    merged = jnp.concatenate([s["scores"], fin], axis=1)
    scores, best = jax.lax.top_k(merged, k)
    seqs = jnp.take_along_axis(jnp.concatenate([s["seqs"], cand_seqs], axis=1), best[:, :, None],
                               axis=1)
    done = jnp.take_along_axis(jnp.concatenate([s["done"], ended], axis=1), best, axis=1)
    # Can the best running beam (scored at its current length) beat the worst finished one?
    best_running = run_scores[:, 0] / penalty_N1[i + 1]
    worst = jnp.where(done, jnp.min(scores, axis=1, keepdims=True), NEG)
    still_open = s["open"] & jnp.any(best_running[:, None] > worst, axis=1)
    go_on = jnp.any(still_open) & ~jnp.all(hits)
    state = dict(i=i + 1, run_seqs=run_seqs, run_scores=run_scores, seqs=seqs, scores=scores,
                 done=done, open=still_open, go_on=go_on)
    return state, parent.reshape(-1), run_seqs[:, :, i].reshape(-1)

  fill = jnp.full((batch, k, n), pad_id, jnp.int32)
  state = dict(
      i=jnp.int32(0), run_seqs=fill,
      run_scores=jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, NEG).astype(jnp.float32), (batch, 1)),
      seqs=fill, scores=jnp.full((batch, k), NEG, jnp.float32), done=jnp.zeros((batch, k), bool),
      open=jnp.ones(batch, bool), go_on=jnp.bool_(True))
  state, parent_R, token_R = select(state, logits_RxV)

  def body(carry):
    state, parent_R, token_R, cache = carry
    cache = reorder(cache, parent_R)
    logits_RxV, cache = step(cache, token_R, state["i"])
    state, parent_R, token_R = select(state, logits_RxV)
    return state, parent_R, token_R, cache

  carry = jax.lax.while_loop(lambda c: c[0]["go_on"], body, (state, parent_R, token_R, cache))
  return carry[0]["seqs"][:, 0]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "greedy", "top_k"))
def sample_loop(model, params, ids_BxT, mask_BxT, rows_B, seed, eos_id, pad_id, temperature,
                top_p, *, max_new_tokens: int, greedy: bool, top_k: int):
  """Greedy or sampled tokens BxN for left-padded prompts (see sample_tokens)."""
  logits_BxV, cache, pos_B = _prefill(model, params, ids_BxT, mask_BxT, max_new_tokens)
  step = lambda cache, token_B, i: _step(model, params, cache, token_B, pos_B + i - 1)
  return sample_tokens(step, logits_BxV, cache, seed, rows_B, eos_id, pad_id, temperature, top_p,
                       max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "num_beams"))
def beam_loop(model, params, ids_BxT, mask_BxT, eos_id, pad_id, penalty_N1, *,
              max_new_tokens: int, num_beams: int):
  """The best beam per left-padded prompt, BxN (see beam_tokens)."""
  length = ids_BxT.shape[1]
  logits_BxV, cache, pos_B = _prefill(model, params, ids_BxT, mask_BxT, max_new_tokens)
  axes = batch_axes(lambda b: gpt.init_cache(model, b, length + max_new_tokens))
  pos_R = jnp.repeat(pos_B, num_beams)
  step = lambda cache, token_R, i: _step(model, params, cache, token_R, pos_R + i - 1)
  reorder = lambda cache, rows_R: take_rows(cache, axes, rows_R)
  return beam_tokens(step, reorder, logits_BxV, cache, eos_id, pad_id, penalty_N1,
                     max_new_tokens=max_new_tokens, num_beams=num_beams)


def length_penalties(max_new_tokens: int, length_penalty: float) -> np.ndarray:
  """n ** length_penalty for n = 0..N, in float64 then float32 (Hugging Face's rounding)."""
  return np.array([float(i) ** length_penalty if i else 1.0
                   for i in range(max_new_tokens + 1)], np.float32)
