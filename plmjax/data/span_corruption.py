"""T5's span corruption: drop random spans of a token run into the targets.

For a run of `tokens_length` tokens (t5.data.preprocessors.span_corruption):
  noise mask   round(L * noise_density) noise tokens (at least 1, at most L - 1) in
               round(noise / mean_noise_span_length) spans (at least 1); noise and
               non-noise tokens are each cut into that many non-empty spans at random
               (T5's _random_segmentation) and interleaved, non-noise first, so the run
               always ends with a noise span (random_spans_noise_mask).
  inputs       the run with each noise span replaced by one sentinel, then </s>
  targets      each noise span after its sentinel, then </s>
Sentinel k (the k-th span) is `sentinel_id - k`, where sentinel_id is <extra_id_0>'s id:
Hugging Face's numbering, and T5's (vocab_size - 1 - k).

`lengths` is T5's random_spans_helper: the longest run whose corrupted inputs fit
data.max_seq_len and whose targets fit data.max_target_len, so nothing is ever cut.
Everything is numpy and deterministic in the rng's key (`example_rng(seed, epoch,
index)`), so a pipeline can resume at any example.
"""

import dataclasses

import numpy as np

from plmjax.errors import ConfigError

NUM_SENTINELS = 100  # <extra_id_0> .. <extra_id_99>: at most this many spans per example


def _counts(tokens_length: int, noise_density: float, mean_noise_span_length: float):
  """(noise tokens, noise spans) of a run, with T5's rounding (float32, half to even)."""
  length = max(tokens_length, 2)
  noise = int(np.round(np.float32(length) * np.float32(noise_density)))
  noise = min(max(noise, 1), length - 1)
  spans = int(np.round(np.float32(noise) / np.float32(mean_noise_span_length)))
  return noise, max(spans, 1)


def corrupted_lengths(tokens_length: int, noise_density: float,
                      mean_noise_span_length: float) -> tuple[int, int]:
  """(inputs length, targets length) of a corrupted run, </s> included."""
  noise, spans = _counts(tokens_length, noise_density, mean_noise_span_length)
  return tokens_length - noise + spans + 1, noise + spans + 1


@dataclasses.dataclass(frozen=True)
class Lengths:
  tokens: int  # raw tokens per example
  inputs: int  # corrupted inputs, </s> included (<= max_seq_len)
  targets: int  # targets, </s> included (<= max_target_len)


def lengths(max_seq_len: int, max_target_len: int, noise_density: float = 0.15,
            mean_noise_span_length: float = 3.0) -> Lengths:
  """The longest raw run whose inputs and targets fit (T5's random_spans_helper, which
  sizes only the inputs; here the targets, and the 100 sentinels, bound the run too)."""
  if not 0 < noise_density < 1:
    raise ConfigError(f"config.data.noise_density={noise_density} must be in (0, 1)")
  if mean_noise_span_length < 1:
    raise ConfigError(f"config.data.mean_noise_span_length={mean_noise_span_length} must be "
                      "at least 1")

  def fits(n):
    inputs, targets = corrupted_lengths(n, noise_density, mean_noise_span_length)
    spans = _counts(n, noise_density, mean_noise_span_length)[1]
    return inputs <= max_seq_len and targets <= max_target_len and spans <= NUM_SENTINELS

  if not fits(2):
    raise ConfigError(f"config.data.max_seq_len={max_seq_len} / config.data.max_target_len="
                      f"{max_target_len} leave no room for a corrupted example; raise them")
  n = 2
  while fits(n + 1):
    n += 1
  inputs, targets = corrupted_lengths(n, noise_density, mean_noise_span_length)
  return Lengths(n, inputs, targets)


def example_rng(seed: int, *index: int) -> np.random.Generator:
  """The generator of one example, keyed by (seed, epoch, index, ...)."""
  return np.random.default_rng([seed, *index])


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator):
  """Lengths of `num_segments` non-empty segments partitioning `num_items` items at random."""
  first_in_segment = np.zeros(num_items, np.int64)
  first_in_segment[1:][rng.permutation(num_items - 1) < num_segments - 1] = 1
  return np.bincount(np.cumsum(first_in_segment), minlength=num_segments)


def noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
               rng: np.random.Generator) -> np.ndarray:
  """Boolean [length]: True on noise tokens (T5's random_spans_noise_mask)."""
  orig_length, length = length, max(length, 2)
  noise, spans = _counts(length, noise_density, mean_noise_span_length)
  noise_lengths = _random_segmentation(noise, spans, rng)
  nonnoise_lengths = _random_segmentation(length - noise, spans, rng)
  interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
  span_starts = np.cumsum(interleaved)[:-1]
  start_indicator = np.zeros(length, np.int64)
  start_indicator[span_starts] = 1
  return (np.cumsum(start_indicator) % 2 == 1)[:orig_length]


def _replace_spans(tokens: np.ndarray, mask: np.ndarray, sentinel_id: int) -> np.ndarray:
  """Each run of masked tokens -> one sentinel (sentinel_id, sentinel_id - 1, ...)."""
  prev = np.concatenate([[False], mask[:-1]])
  first = mask & ~prev
  sentinels = sentinel_id + 1 - np.cumsum(first)
  out = np.where(first, sentinels, tokens)
  return out[~(mask & prev)]


def corrupt(tokens, mask: np.ndarray, sentinel_id: int, eos_id: int):
  """(inputs, targets) int32 of `tokens` under the noise mask, each ending with eos_id."""
  tokens = np.asarray(tokens, np.int64)
  inputs = _replace_spans(tokens, mask, sentinel_id)
  targets = _replace_spans(tokens, ~mask, sentinel_id)
  eos = np.array([eos_id])
  return (np.concatenate([inputs, eos]).astype(np.int32),
          np.concatenate([targets, eos]).astype(np.int32))


def uncorrupt(inputs, targets, sentinel_id: int, eos_id: int) -> np.ndarray:
  """The original tokens back from (inputs, targets): each sentinel of the inputs
  replaced by the tokens that follow it in the targets."""
  inputs, targets = (np.asarray(x)[:-1] if len(x) and x[-1] == eos_id else np.asarray(x)
                     for x in (inputs, targets))
  spans, current = {}, None
  for t in targets.tolist():
    if sentinel_id - NUM_SENTINELS < t <= sentinel_id:
      current = spans.setdefault(t, [])
    elif current is not None:
      current.append(t)
  out = []
  for t in inputs.tolist():
    if sentinel_id - NUM_SENTINELS < t <= sentinel_id:
      out.extend(spans.get(t, []))
    else:
      out.append(t)
  return np.array(out, np.int32)


def span_corruption_example(tokens, rng: np.random.Generator, *, sentinel_id: int, eos_id: int,
                            pad_id: int, max_seq_len: int, max_target_len: int,
                            noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> dict[str, np.ndarray]:
  """One padded example from a run of at most lengths(...).tokens tokens.

  Returns int32 arrays: input_ids, attention_mask [max_seq_len]; labels,
  decoder_input_ids (labels shifted right after pad_id, T5's decoder start),
  decoder_attention_mask [max_target_len].
  """
  tokens = np.asarray(tokens)
  mask = noise_mask(len(tokens), noise_density, mean_noise_span_length, rng)
  inputs, targets = corrupt(tokens, mask, sentinel_id, eos_id)
  if len(inputs) > max_seq_len or len(targets) > max_target_len:
    raise ValueError(f"a run of {len(tokens)} tokens corrupts to {len(inputs)} inputs and "
                     f"{len(targets)} targets, over {max_seq_len}/{max_target_len}: cut runs to "
                     "span_corruption.lengths(...).tokens")

  def pad(x, n):
    return np.concatenate([x, np.full(n - len(x), pad_id, np.int32)]).astype(np.int32)

  labels = pad(targets, max_target_len)
  return dict(
      input_ids=pad(inputs, max_seq_len),
      attention_mask=(np.arange(max_seq_len) < len(inputs)).astype(np.int32),
      labels=labels,
      decoder_input_ids=np.concatenate([[pad_id], labels[:-1]]).astype(np.int32),
      decoder_attention_mask=(np.arange(max_target_len) < len(targets)).astype(np.int32),
  )
