"""16-bit dropout: drop rate, independence of the two halves of a word, expectation, RNG use."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plmjax.models import dropout


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_drop_rate_matches_threshold(rate):
  shape = (32, 128, 513)  # odd last axis: the high halves fill one element fewer
  keep = np.asarray(dropout.keep_mask(jax.random.key(0), rate, shape))
  assert keep.shape == shape and keep.dtype == bool
  p = dropout.threshold(rate) / 2**16
  assert abs(p - rate) < 1e-4
  n = keep.size
  sigma = np.sqrt(p * (1 - p) / n)
  assert abs((1 - keep.mean()) - p) < 5 * sigma
  # Low halves decide the first 257 elements of the last axis, high halves the rest.
  for part in (keep[..., :257], keep[..., 257:]):
    assert abs((1 - part.mean()) - p) < 5 * np.sqrt(p * (1 - p) / part.size)


def test_low_and_high_halves_are_independent():
  keep = np.asarray(dropout.keep_mask(jax.random.key(3), 0.5, (4096, 512))).astype(np.float64)
  lo, hi = keep[:, :256].ravel(), keep[:, 256:].ravel()  # decided by the same 32-bit words
  corr = np.corrcoef(lo, hi)[0, 1]
  assert abs(corr) < 5 / np.sqrt(lo.size)
  neighbours = np.corrcoef(keep[:, :-1].ravel(), keep[:, 1:].ravel())[0, 1]
  assert abs(neighbours) < 5 / np.sqrt(keep.size)


def test_keys_give_different_masks_and_same_key_the_same():
  a = dropout.keep_mask(jax.random.key(1), 0.1, (64, 64))
  b = dropout.keep_mask(jax.random.key(2), 0.1, (64, 64))
  assert not np.array_equal(a, b)
  np.testing.assert_array_equal(a, dropout.keep_mask(jax.random.key(1), 0.1, (64, 64)))


def test_apply_keeps_the_expectation_and_zeroes_dropped():
  x = jnp.full((512, 1024), 2.0)
  y = np.asarray(dropout.apply(x, jax.random.key(0), 0.1))
  assert set(np.unique(y)) == {0.0, np.float32(2.0 * dropout.keep_scale(0.1))}
  sigma = 2.0 * np.sqrt(0.1 / 0.9 / y.size)
  assert abs(y.mean() - 2.0) < 5 * sigma


def test_tiny_rate_drops_nothing_and_scalar_shapes_work():
  assert dropout.threshold(1e-9) == 0
  assert np.asarray(dropout.keep_mask(jax.random.key(0), 1e-9, (100, 100))).all()
  assert dropout.keep_mask(jax.random.key(0), 0.3, ()).shape == ()


def test_module_uses_the_dropout_stream_and_is_identity_when_deterministic():
  x = jnp.ones((8, 16))
  m = dropout.Dropout(0.5)
  np.testing.assert_array_equal(m.apply({}, x, deterministic=True), x)
  y1 = m.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
  y2 = m.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
  assert not np.array_equal(y1, y2) and (np.asarray(y1) == 0).any()
  with pytest.raises(Exception):
    m.apply({}, x, deterministic=False)  # no "dropout" RNG given
  np.testing.assert_array_equal(dropout.Dropout(1.0).apply({}, x, deterministic=False),
                                jnp.zeros_like(x))
  assert isinstance(m, nn.Module)
