"""On-device decode loops for T5: greedy / sampling and beam search, one jit call per batch.

Sources come right-padded (BxS ids, 1/0 attention mask). Each call runs the encoder once,
feeds the decoder start token (T5's is <pad>) with the encoder states, which stores the
cross-attention keys/values in the decoder's cache, then `jax.lax.while_loop` feeds one
token per row per step through the self-attention KV cache (max_new_tokens slots) until
every row has produced eos_id or max_new_tokens tokens. Nothing returns to the host in
between.

The loops return generated ids BxN (N = max_new_tokens), without the start token;
positions after a row's end hold pad_id, and a row that stopped at end of sequence holds
eos_id at its end. Sampling reuses plmjax.decoding's filter (top-k, then top-p), and beam
search its Hugging Face rules (plmjax.decoding's docstring): T5's decoder prompt is the
start token, so lengths count generated tokens, as HF's `generate` of an encoder-decoder.

  from plmjax.seq2seq_decoding import generate_seq2seq_ids
  new = generate_seq2seq_ids(model, params, sources, max_new_tokens=32, eos_id=1)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from plmjax.decoding import NEG, filter_logits, length_penalties
from plmjax.errors import ConfigError, UserError
from plmjax.models import t5

SOURCE_BUCKET = 8  # source lengths round up to a multiple: fewer compilations


def _batch_axes(model, max_len: int, source_len: int):
  """Per cache leaf, the axis that holds the batch (None: shared by all rows)."""
  one, two = (jax.eval_shape(lambda b=b: t5.init_cache(model, b, max_len, source_len))
              for b in (1, 2))

  def axis(a, b):
    diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
    return diff[0] if diff else None
  return jax.tree.map(axis, one, two)


def _take_rows(cache, axes, rows_R):
  return jax.tree.map(lambda x, a: x if a is None else jnp.take(x, rows_R, axis=a), cache, axes)


def _start(model, params, ids_BxS, mask_BxS, start_id, max_new: int):
  """Encoder once, then the start token through an empty cache (storing the cross-attention
  k/v); returns (logits BxV of the first new token, cache)."""
  batch, source_len = ids_BxS.shape
  variables = {"params": params}
  enc_BxSxD = model.apply(variables, ids_BxS, mask_BxS, method="encode")
  cache = t5.init_cache(model, batch, max_new, source_len)
  start_Bx1 = jnp.full((batch, 1), start_id, jnp.int32)
  out, mut = model.apply({**variables, "cache": cache}, start_Bx1, enc_BxSxD, mask_BxS,
                         decode=True, method="decode", mutable=["cache"])
  return out["logits"][:, -1], mut["cache"]


def _step(model, params, cache, tokens_R, mask_RxS):
  """One token per row through the cache (cross-attention k/v from it); (logits RxV, cache)."""
  out, mut = model.apply({"params": params, "cache": cache}, tokens_R[:, None], None, mask_RxS,
                         decode=True, method="decode", mutable=["cache"])
  return out["logits"][:, -1], mut["cache"]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "greedy", "top_k"))
def sample_loop(model, params, ids_BxS, mask_BxS, rows_B, seed, start_id, eos_id, pad_id,
                temperature, top_p, *, max_new_tokens: int, greedy: bool, top_k: int):
  """Greedy (greedy=True) or sampled tokens BxN. Row b draws from key(seed) folded with
  rows_B[b] (the source's index) and the step, so a source's sample does not depend on the
  rest of its batch."""
  batch = ids_BxS.shape[0]
  keys_B = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(rows_B)
  logits_BxV, cache = _start(model, params, ids_BxS, mask_BxS, start_id, max_new_tokens)

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
    logits_BxV, cache = _step(model, params, cache, token_B, mask_BxS)
    out_BxN, done_B, token_B = record(out_BxN, done_B, pick(logits_BxV, i), i)
    return i + 1, token_B, out_BxN, done_B, cache

  state = (jnp.int32(1), token_B, out_BxN, done_B, cache)
  return jax.lax.while_loop(cond, body, state)[2]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "num_beams"))
def beam_loop(model, params, ids_BxS, mask_BxS, start_id, eos_id, pad_id, penalty_N1, *,
              max_new_tokens: int, num_beams: int):
  """The best beam per source, BxN (plmjax.decoding.beam_loop's rules on T5's cache)."""
  batch, source_len = ids_BxS.shape
  k, n = num_beams, max_new_tokens
  k2 = 2 * k
  logits_BxV, cache = _start(model, params, ids_BxS, mask_BxS, start_id, n)
  axes = _batch_axes(model, n, source_len)
  cache = _take_rows(cache, axes, jnp.repeat(jnp.arange(batch), k))  # K beams per source
  mask_RxS = jnp.repeat(mask_BxS, k, axis=0)
  vocab = logits_BxV.shape[-1]
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
    run_scores, keep = jax.lax.top_k(cand_scores + hits * NEG, k)
    run_seqs = jnp.take_along_axis(cand_seqs, keep[:, :, None], axis=1)
    parent = jnp.take_along_axis(cand_beam, keep, axis=1) + jnp.arange(batch)[:, None] * k
    ended = hits & (jnp.arange(k2) < k)[None, :]
    fin = cand_scores / penalty_N1[i + 1] + (~s["open"])[:, None] * NEG + (~ended) * NEG
    scores, best = jax.lax.top_k(jnp.concatenate([s["scores"], fin], axis=1), k)
    seqs = jnp.take_along_axis(jnp.concatenate([s["seqs"], cand_seqs], axis=1), best[:, :, None],
                               axis=1)
    done = jnp.take_along_axis(jnp.concatenate([s["done"], ended], axis=1), best, axis=1)
    best_running = run_scores[:, 0] / penalty_N1[i + 1]
    worst = jnp.where(done, jnp.min(scores, axis=1, keepdims=True), NEG)
    still_open = s["open"] & jnp.any(best_running[:, None] > worst, axis=1)
    state = dict(i=i + 1, run_seqs=run_seqs, run_scores=run_scores, seqs=seqs, scores=scores,
                 done=done, open=still_open, go_on=jnp.any(still_open) & ~jnp.all(hits))
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
    cache = _take_rows(cache, axes, parent_R)
    logits_RxV, cache = _step(model, params, cache, token_R, mask_RxS)
    state, parent_R, token_R = select(state, logits_RxV)
    return state, parent_R, token_R, cache

  carry = jax.lax.while_loop(lambda c: c[0]["go_on"], body, (state, parent_R, token_R, cache))
  return carry[0]["seqs"][:, 0]


def right_pad(sources: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """BxS ids and 1/0 mask, real tokens first; S rounded up to a multiple of SOURCE_BUCKET."""
  length = -(-max(len(s) for s in sources) // SOURCE_BUCKET) * SOURCE_BUCKET
  ids = np.full((len(sources), length), pad_id, np.int32)
  mask = np.zeros((len(sources), length), np.int32)
  for row, s in enumerate(sources):
    ids[row, :len(s)] = s
    mask[row, :len(s)] = 1
  return ids, mask


def generate_seq2seq_ids(model, params, sources: list[list[int]], *, max_new_tokens: int,
                         eos_id: int, pad_id: int = 0, batch_size: int = 16, num_beams: int = 1,
                         length_penalty: float = 1.0, temperature: float = 0.0, top_k: int = 0,
                         top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
  """Per source (encoder ids, ending with </s> as T5 expects), the generated target ids,
  cut before the first eos_id. The decoder starts from pad_id (T5's start token).

  temperature 0: greedy; num_beams > 1: beam search (temperature, top_k, top_p unused).
  Sources are sorted by length into right-padded batches of `batch_size` (the last one
  filled with copies); each batch is one call of a jitted on-device loop. A source's
  sample depends on (seed, its index), not on the batch it lands in.
  """
  if not sources:
    raise UserError("no sources to generate from")
  if max_new_tokens < 1 or batch_size < 1 or num_beams < 1:
    raise ConfigError("need max_new_tokens, batch_size and num_beams >= 1")
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise ConfigError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
  for i, s in enumerate(sources):
    if not s:
      raise UserError(f"source {i + 1} is empty after tokenization; give some text")
  eos = -1 if eos_id is None else int(eos_id)
  params = jax.device_put(params)
  scalars = jax.device_put((np.int32(seed), np.int32(pad_id), np.int32(eos), np.int32(pad_id),
                            np.float32(temperature or 1.0), np.float32(top_p),
                            length_penalties(max_new_tokens, length_penalty)))
  seed_, start_, eos_, pad_, temperature_, top_p_, penalties_N1 = scalars
  order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
  batch = min(batch_size, len(sources))
  results: list[list[int]] = [[] for _ in sources]
  for first in range(0, len(order), batch):
    chosen = order[first:first + batch]
    rows = chosen + [chosen[-1]] * (batch - len(chosen))  # a full batch: one compilation
    ids_BxS, mask_BxS = jax.device_put(right_pad([sources[i] for i in rows], pad_id))
    if num_beams > 1:
      out_BxN = beam_loop(model, params, ids_BxS, mask_BxS, start_, eos_, pad_, penalties_N1,
                          max_new_tokens=max_new_tokens, num_beams=num_beams)
    else:
      out_BxN = sample_loop(model, params, ids_BxS, mask_BxS,
                            jax.device_put(np.asarray(rows, np.int32)), seed_, start_, eos_,
                            pad_, temperature_, top_p_, max_new_tokens=max_new_tokens,
                            greedy=temperature == 0, top_k=top_k)
    for i, row in zip(chosen, jax.device_get(out_BxN)):
      row = row.tolist()
      results[i] = row[:row.index(eos)] if eos in row else row
  return results
