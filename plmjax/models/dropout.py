"""Dropout that draws 16 random bits per element instead of 32.

`jax.random.bernoulli` spends one 32-bit word, i.e. one threefry2x32 block, on
every element. A keep/drop decision at rate 0.1 needs far fewer bits, so here one
32-bit word decides two elements (its low and high 16 bits): half the
random-number work, which is about 7% of a BERT-Small training step on CPU
(bench/RESULTS.md).

An element is kept when its 16 bits are >= round(rate * 2^16), so the drop
probability is that threshold / 2^16 (0.100006 for rate 0.1); kept values are
scaled by the exact inverse of the keep probability, so the expectation of the
output equals the input. The bits come from `jax.random.bits` over an array
shaped like the input (last axis halved), so it partitions like the input does
(except along the last axis, which no activation sharding rule here splits).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

_LEVELS = 1 << 16


def threshold(rate: float) -> int:
  """How many of the 2^16 levels drop: round(rate * 2^16), at most 2^16 - 1.

  Rates below 2^-17 round to 0 and drop nothing.
  """
  return min(round(rate * _LEVELS), _LEVELS - 1)


def keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
  """Boolean mask of `shape`, each element kept with probability 1 - threshold(rate)/2^16."""
  lead, last = (tuple(shape[:-1]), shape[-1]) if shape else ((), 1)
  words = jax.random.bits(key, (*lead, math.ceil(last / 2)), jnp.uint32)
  t = threshold(rate)
  # Low halves decide the first ceil(last/2) elements of the last axis, high halves the rest.
  keep = jnp.concatenate([(words & 0xFFFF) >= t, (words >> 16) >= t], axis=-1)
  return keep[..., :last].reshape(shape)


def keep_scale(rate: float) -> float:
  """1 / P(keep): the factor that keeps the expectation unchanged."""
  return _LEVELS / (_LEVELS - threshold(rate))


def apply(x: jax.Array, key: jax.Array, rate: float) -> jax.Array:
  keep = keep_mask(key, rate, x.shape)
  return jnp.where(keep, x * jnp.asarray(keep_scale(rate), x.dtype), jnp.zeros_like(x))


class Dropout(nn.Module):
  """Drop-in for `nn.Dropout(rate)(x, deterministic)` using the "dropout" RNG stream."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    return apply(x, self.make_rng("dropout"), self.rate)
