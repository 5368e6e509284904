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

from plmjax import decoding
from plmjax.decoding import length_penalties
from plmjax.errors import ConfigError, UserError
from plmjax.models import t5

SOURCE_BUCKET = 8  # source lengths round up to a multiple: fewer compilations


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
  """Greedy (greedy=True) or sampled tokens BxN (plmjax.decoding.sample_tokens on T5's
  cache): a source's sample depends on (seed, its index rows_B[b]), not on its batch."""
  logits_BxV, cache = _start(model, params, ids_BxS, mask_BxS, start_id, max_new_tokens)
  step = lambda cache, token_B, i: _step(model, params, cache, token_B, mask_BxS)
  return decoding.sample_tokens(step, logits_BxV, cache, seed, rows_B, eos_id, pad_id,
                                temperature, top_p, max_new_tokens=max_new_tokens,
                                greedy=greedy, top_k=top_k)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "num_beams"))
def beam_loop(model, params, ids_BxS, mask_BxS, start_id, eos_id, pad_id, penalty_N1, *,
              max_new_tokens: int, num_beams: int):
  """The best beam per source, BxN (plmjax.decoding.beam_tokens on T5's cache)."""
  source_len = ids_BxS.shape[1]
  logits_BxV, cache = _start(model, params, ids_BxS, mask_BxS, start_id, max_new_tokens)
  axes = decoding.batch_axes(lambda b: t5.init_cache(model, b, max_new_tokens, source_len))
  mask_RxS = jnp.repeat(mask_BxS, num_beams, axis=0)
  step = lambda cache, token_R, i: _step(model, params, cache, token_R, mask_RxS)
  reorder = lambda cache, rows_R: decoding.take_rows(cache, axes, rows_R)
  return decoding.beam_tokens(step, reorder, logits_BxV, cache, eos_id, pad_id, penalty_N1,
                              max_new_tokens=max_new_tokens, num_beams=num_beams)


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
