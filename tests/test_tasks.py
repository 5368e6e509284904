"""Fine-tuning objectives: sums -> finalize gives the evaluation's names and mean losses."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plmjax.finetune import tasks


def _nll(logits, labels):
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))
  return -np.take_along_axis(logp, np.asarray(labels)[..., None], axis=-1)[..., 0]


def _logged(task_type, out, batch):
  """What the trainer logs: finalize of the step's sums, with the step's mean `loss` added."""
  objective = tasks.OBJECTIVES[task_type]
  sums = objective.sums(out, batch)
  assert "loss" not in sums  # the train step's mean loss would overwrite it
  step_metrics = dict(sums, loss=objective.loss(sums, objective.totals(batch)))
  return objective.finalize(jax.device_get(step_metrics))


def test_classification_uniform_logits_give_ln2():
  batch = dict(labels=jnp.array([0, 1, 1, 0]), weights=jnp.array([1, 1, 1, 0]))
  out = dict(logits=jnp.zeros((4, 2)))
  got = _logged("classification", out, batch)
  assert set(got) == {"loss", "accuracy"}
  assert got["loss"] == pytest.approx(math.log(2), rel=1e-6)


def test_classification_matches_compute_metrics():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 3)).astype(np.float32)
  labels = rng.integers(0, 3, 6)
  batch = dict(labels=jnp.asarray(labels), weights=jnp.ones(6))
  got = _logged("classification", dict(logits=jnp.asarray(logits)), batch)
  task = types.SimpleNamespace(type="classification", labels=("a", "b", "c"), metrics=())
  want = tasks.compute_metrics(task, types.SimpleNamespace(examples=labels), dict(logits=logits))
  assert set(got) == set(want)
  assert got["loss"] == pytest.approx(_nll(logits, labels).mean(), rel=1e-5)
  assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
  assert got["accuracy"] == pytest.approx(want["accuracy"])


def test_regression_mean_squared_error():
  batch = dict(labels=jnp.array([1.0, 2.0, 0.5]), weights=jnp.array([1, 1, 0]))
  out = dict(logits=jnp.array([[0.0], [4.0], [9.0]]))
  got = _logged("regression", out, batch)
  assert set(got) == {"loss"}
  assert got["loss"] == pytest.approx((1.0 + 4.0) / 2)


def test_tagging_counts_labelled_tokens_only():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 3)).astype(np.float32)
  labels = np.array([[0, 2, -100, 1, -100], [1, -100, -100, 0, 2]])
  batch = dict(labels=jnp.asarray(labels), weights=jnp.array([1, 1]))
  got = _logged("tagging", dict(logits=jnp.asarray(logits)), batch)
  assert set(got) == {"loss", "accuracy"}
  keep = labels >= 0
  assert got["loss"] == pytest.approx(_nll(logits[keep], labels[keep]).mean(), rel=1e-5)
  right = logits[keep].argmax(-1) == labels[keep]
  assert got["accuracy"] == pytest.approx(right.mean())


def test_qa_mean_of_start_and_end_losses():
  rng = np.random.default_rng(2)
  start, end = rng.normal(size=(2, 4, 7)).astype(np.float32)
  starts, ends = np.array([1, 0, 6, 3]), np.array([2, 0, 6, 5])
  batch = dict(start_positions=jnp.asarray(starts), end_positions=jnp.asarray(ends),
               weights=jnp.ones(4))
  got = _logged("qa", dict(start_logits=jnp.asarray(start), end_logits=jnp.asarray(end)), batch)
  assert set(got) == {"loss", "start_accuracy", "end_accuracy"}
  want = (_nll(start, starts) + _nll(end, ends)).mean() / 2
  assert got["loss"] == pytest.approx(want, rel=1e-5)
  assert got["start_accuracy"] == pytest.approx((start.argmax(-1) == starts).mean())
  assert got["end_accuracy"] == pytest.approx((end.argmax(-1) == ends).mean())
