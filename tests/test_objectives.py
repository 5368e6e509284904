"""Pretraining losses and metrics against their textbook definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from plmjax.train import objectives


def _reference(logits, labels, weights):
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return (nll * weights).sum(), (correct * weights).sum(), weights.sum()


def test_xent_sums_equal_log_softmax_and_argmax_definitions():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  logits = 4.0 * jax.random.normal(k1, (6, 20, 301))
  labels = jax.random.randint(k2, (6, 20), 0, 301)
  labels = labels.at[0, :5].set(jnp.argmax(logits[0, :5], -1))  # some correct predictions
  weights = (jax.random.uniform(k3, (6, 20)) < 0.8).astype(jnp.float32)
  got = objectives.xent_sums(logits, labels, weights)
  want = _reference(logits, labels, weights)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5)
  assert float(want[1]) > 0  # the forced argmax labels count as correct

  def loss(fn, x):
    return fn(x, labels, weights)[0]

  g_got = jax.grad(lambda x: loss(objectives.xent_sums, x))(logits)
  g_want = jax.grad(lambda x: loss(_reference, x))(logits)
  np.testing.assert_allclose(g_got, g_want, atol=1e-6)


def test_bert_loss_is_mean_mlm_plus_mean_nsp():
  k1, k2 = jax.random.split(jax.random.key(1))
  outputs = dict(mlm_logits=jax.random.normal(k1, (4, 3, 50)),
                 nsp_logits=jax.random.normal(k2, (4, 2)))
  batch = dict(masked_labels=jnp.array([[1, 2, 3]] * 4), masked_weights=jnp.ones((4, 3)),
               nsp_labels=jnp.array([0, 1, 1, 0]))
  obj = objectives.PRETRAINING["bert"]
  loss = obj.loss(obj.sums(outputs, batch), obj.totals(batch))
  mlm = optax.softmax_cross_entropy_with_integer_labels(
      outputs["mlm_logits"], batch["masked_labels"]).mean()
  nsp = optax.softmax_cross_entropy_with_integer_labels(
      outputs["nsp_logits"], batch["nsp_labels"]).mean()
  np.testing.assert_allclose(loss, mlm + nsp, rtol=1e-6)
