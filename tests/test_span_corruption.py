"""Span corruption against T5's definition: counts, measured density and span length,
sentinel order, reconstruction, lengths that fit, determinism."""

import numpy as np
import pytest

from plmjax.data import span_corruption as sc
from plmjax.errors import ConfigError

SENTINEL, EOS, PAD = 999, 1, 0


def spans_of(mask):
  """Lengths of the runs of True in a boolean row."""
  edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
  return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


def test_lengths_as_t5_random_spans_helper():
  # T5's published figures: 512 inputs hold 568 raw tokens; targets are 114 long.
  assert sc.lengths(512, 114) == sc.Lengths(568, 512, 114)
  assert sc.lengths(512, 10_000) == sc.Lengths(568, 512, 114)
  assert sc.lengths(128, 32) == sc.Lengths(141, 128, 29)
  for max_seq_len in (16, 64, 100, 256, 1024):
    for max_target_len in (8, 20, 64, 400):
      got = sc.lengths(max_seq_len, max_target_len)
      assert (got.inputs, got.targets) == sc.corrupted_lengths(got.tokens, 0.15, 3.0)
      assert got.inputs <= max_seq_len and got.targets <= max_target_len
      more = sc.corrupted_lengths(got.tokens + 1, 0.15, 3.0)
      spans = round(round((got.tokens + 1) * 0.15) / 3)
      assert more[0] > max_seq_len or more[1] > max_target_len or spans > sc.NUM_SENTINELS


def test_lengths_errors():
  with pytest.raises(ConfigError, match="noise_density"):
    sc.lengths(128, 32, noise_density=0)
  with pytest.raises(ConfigError, match="max_target_len"):
    sc.lengths(128, 2)


def test_noise_counts_per_row_and_measured_density_and_span_length():
  """Each row: round(L * density) noise tokens in round(noise / mean) spans, all
  non-empty, first token kept, last token noise. Over many rows the noise fraction and
  the mean span length are the configured ones, and noise lands evenly along rows."""
  rng = np.random.default_rng(0)
  noise_total = tokens_total = 0
  all_spans, where = [], np.zeros(10)
  for i in range(1500):
    length = int(rng.integers(20, 600))
    mask = sc.noise_mask(length, 0.15, 3.0, sc.example_rng(7, i))
    noise = int(np.round(np.float32(length) * np.float32(0.15)))
    spans = spans_of(mask)
    assert mask.sum() == noise and len(spans) == max(int(np.round(noise / 3.0)), 1)
    assert spans.min() >= 1 and not mask[0] and mask[-1]
    noise_total, tokens_total = noise_total + noise, tokens_total + length
    all_spans.extend(spans)
    where += np.histogram(np.flatnonzero(mask[1:-1]) / (length - 2), bins=10, range=(0, 1))[0]
  assert abs(noise_total / tokens_total - 0.15) < 0.001
  assert abs(np.mean(all_spans) - 3.0) < 0.05
  # Span lengths of a uniform random segmentation: geometric-like, every length 1..8 seen.
  assert set(range(1, 9)) <= set(all_spans)
  # Evenly, except near the end: T5's rows always end with a noise span.
  assert where[:9].min() / where[:9].max() > 0.9 and where[9] > where[:9].max()


def test_other_density_and_span_length():
  masks = [sc.noise_mask(400, 0.3, 8.0, sc.example_rng(1, i)) for i in range(300)]
  spans = np.concatenate([spans_of(m) for m in masks])
  assert all(m.sum() == 120 for m in masks) and abs(spans.mean() - 8.0) < 0.05


def test_sentinels_in_order_and_reconstruction():
  length = sc.lengths(128, 32)
  for i in range(200):
    rng = sc.example_rng(3, 0, i)
    tokens = rng.integers(2, 900, int(rng.integers(2, length.tokens + 1)))
    mask = sc.noise_mask(len(tokens), 0.15, 3.0, sc.example_rng(3, 1, i))
    inputs, targets = sc.corrupt(tokens, mask, SENTINEL, EOS)
    assert inputs[-1] == EOS and targets[-1] == EOS
    n = len(spans_of(mask))
    in_sentinels = inputs[inputs > SENTINEL - sc.NUM_SENTINELS]
    out_sentinels = targets[targets > SENTINEL - sc.NUM_SENTINELS]
    np.testing.assert_array_equal(in_sentinels, SENTINEL - np.arange(n))
    np.testing.assert_array_equal(out_sentinels, SENTINEL - np.arange(n))
    assert targets[0] == SENTINEL  # runs start with kept tokens
    assert len(inputs) <= length.inputs and len(targets) <= length.targets
    np.testing.assert_array_equal(sc.uncorrupt(inputs, targets, SENTINEL, EOS), tokens)
    # The kept tokens, in order, are the inputs without sentinels and </s>.
    np.testing.assert_array_equal(inputs[(inputs < SENTINEL - 99) & (inputs != EOS)],
                                  tokens[~mask])


def test_padded_example_is_deterministic_and_fits():
  length = sc.lengths(64, 16)
  tokens = np.arange(10, 10 + length.tokens)
  kw = dict(sentinel_id=SENTINEL, eos_id=EOS, pad_id=PAD, max_seq_len=64, max_target_len=16)
  a = sc.span_corruption_example(tokens, sc.example_rng(5, 2, 17), **kw)
  b = sc.span_corruption_example(tokens, sc.example_rng(5, 2, 17), **kw)
  c = sc.span_corruption_example(tokens, sc.example_rng(5, 2, 18), **kw)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["input_ids"], c["input_ids"])
  assert a["input_ids"].shape == (64,) and a["labels"].shape == (16,)
  assert a["attention_mask"].sum() == length.inputs and a["decoder_attention_mask"].sum() == \
      length.targets
  np.testing.assert_array_equal(a["decoder_input_ids"], np.concatenate([[PAD], a["labels"][:-1]]))
  real_in = a["input_ids"][:length.inputs]
  real_out = a["labels"][:length.targets]
  np.testing.assert_array_equal(sc.uncorrupt(real_in, real_out, SENTINEL, EOS), tokens)
  with pytest.raises(ValueError, match="cut runs"):
    sc.span_corruption_example(np.arange(10, 10 + length.tokens + 10), sc.example_rng(0), **kw)
