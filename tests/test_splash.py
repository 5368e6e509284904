"""Splash attention against the xla path: the kernel (Pallas interpret mode on CPU),
tiny BERT and GPT training runs, and the kernel in a train step compiled for a TPU."""

import dataclasses
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plmjax.config import base_config, validate
from plmjax.models import attention, build_model
from plmjax.models.config import ModelConfig
from plmjax.train import compile as compile_lib
from plmjax.train.objectives import PRETRAINING
from plmjax.train.trainer import Trainer
from synthetic import SyntheticBert, Resumable

pytestmark = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed: pip install 'plmjax[tpu]'")

B, L, H, K = 2, 128, 2, 64
XLA = ModelConfig(hidden_size=H * K, num_heads=H, attention_dropout_rate=0.0, attention_impl="xla")
SPLASH = dataclasses.replace(XLA, attention_impl="splash")
# Measured over the cases below (2026-11-30): float32 max |splash - xla| 6e-7 in outputs,
# 2e-6 in gradients; bfloat16 |splash - xla| / |xla| (norms) 2.7e-3 in outputs, 3.4e-3 in
# gradients (both sides bfloat16, float32 softmax).
FP32_ATOL = 1e-5
BF16_RTOL = 1e-2


def _segments(*lengths):
  """One row of segment ids 1, 2, ... of these lengths, then padding (0) up to L."""
  ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
  return np.pad(ids, (0, L - len(ids))).astype(np.int32)


# name: (causal, length, attention_mask BxL, segment_ids BxL)
CASES = {
    "bert_padding": (False, L, np.stack([_segments(100) > 0, _segments(71) > 0]), None),
    "gpt_causal_unaligned_length": (True, 100, None, None),  # padded to 128 inside
    "bert_packed": (False, L, None, np.stack([_segments(50, 40), _segments(30, 30, 60)])),
    "gpt_packed": (True, L, None, np.stack([_segments(64, 64), _segments(20, 90)])),
}


def _attend(cfg, q, k, v, causal, attention_mask, segment_ids):
  mask = attention.make_mask(cfg, attention_mask, segment_ids)
  return attention.dot_product_attention(q, k, v, mask, causal=causal, cfg=cfg)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_splash_matches_xla_outputs_and_gradients(case, dtype):
  causal, length, attention_mask, segment_ids = CASES[case]
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, w = (jax.random.normal(key, (B, length, H, K), dtype) for key in keys)
  # Every position agrees, but the padding queries of packed rows: splash lets them
  # attend to padding, xla to everything. They are compared nowhere and weigh nothing.
  real_BxL = np.ones((B, length), bool) if segment_ids is None else segment_ids != 0
  weights = jnp.asarray(real_BxL[:, :, None, None], dtype)

  def run(cfg):
    def loss(q, k, v):
      out = _attend(cfg, q, k, v, causal, attention_mask, segment_ids)
      return (out.astype(jnp.float32) * w * weights).sum(), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(x, np.float32) for x in (out, *grads)]

  got, want = run(SPLASH), run(XLA)
  got[0], want[0] = got[0][real_BxL], want[0][real_BxL]
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    if dtype == "float32":
      np.testing.assert_allclose(a, b, atol=FP32_ATOL, rtol=0, err_msg=name)
    else:
      assert np.linalg.norm(a - b) <= BF16_RTOL * np.linalg.norm(b), name


def test_splash_mask_is_segment_ids():
  am = jnp.array([[1, 1, 0]])
  mask = attention.make_mask(SPLASH, am, None)
  assert mask.impl == "splash" and mask.dense is None
  # Padding: as xla's key mask, every query attends to the real keys.
  np.testing.assert_array_equal(mask.q_ids_BxL, [[1, 1, 1]])
  np.testing.assert_array_equal(mask.kv_ids_BxL, [[1, 1, 0]])
  seg = jnp.array([[1, 2, 0]])  # packed: padding attends to padding
  packed = attention.make_mask(SPLASH, am, seg)
  np.testing.assert_array_equal(packed.q_ids_BxL, seg)
  np.testing.assert_array_equal(packed.kv_ids_BxL, seg)
  assert attention.make_mask(SPLASH).q_ids_BxL is None


def test_splash_rows_of_padding_only_stay_finite():
  q, k, v = (jax.random.normal(key, (1, L, H, K)) for key in jax.random.split(jax.random.key(1), 3))
  out = _attend(SPLASH, q, k, v, True, jnp.zeros((1, L), jnp.int32), None)
  assert np.all(np.isfinite(out))


# ------------------------------------------------------------------ training runs

BATCH, STEPS = 4, 3


def _config(arch, impl):
  c = base_config(arch)
  c.model.update(num_layers=1, hidden_size=H * K, num_heads=H, intermediate_size=128,
                 vocab_size=64, max_position_embeddings=L, dropout_rate=0.0,
                 attention_dropout_rate=0.0, attention_impl=impl)
  c.data.max_seq_len = L
  c.train.update(steps=STEPS, batch_size=BATCH, learning_rate=1e-2, warmup_steps=1,
                 log_every_steps=1)
  c.checkpoint.update(every_steps=100, async_save=False)
  c.mesh.update(data=2, tensor=2)  # the kernel shard_mapped over batch and heads
  return c


class SyntheticGpt(Resumable):
  """Packed GPT rows: two documents and padding, each document predicting its next token."""

  def __init__(self, batch_size, seed=0):
    self.b, self.seed, self.index = batch_size, seed, 0

  def make(self, rng):
    seg = np.stack([_segments(n, L - 20 - n) for n in rng.integers(10, 90, self.b)])
    ids = np.where(seg > 0, rng.integers(1, 64, (self.b, L)), 0).astype(np.int32)
    pos = np.zeros_like(seg)
    for r in range(self.b):
      for s in (1, 2):
        pos[r, seg[r] == s] = np.arange((seg[r] == s).sum())
    targets = np.roll(ids, -1, axis=1)
    weights = ((seg > 0) & (np.roll(seg, -1, axis=1) == seg)).astype(np.float32)
    return dict(input_ids=ids, targets=targets, loss_weights=weights, segment_ids=seg,
                position_ids=pos)


def _losses(arch, impl, workdir):
  config = _config(arch, impl)
  data, head = {"bert": (lambda: SyntheticBert(BATCH, seq_len=L), "pretraining"),
                "gpt": (lambda: SyntheticGpt(BATCH), "lm")}[arch]
  trainer = Trainer(config, str(workdir), build_model(validate(config), head),
                    PRETRAINING[arch], next(data()), flops_per_token=1.0, tokens_per_example=L,
                    devices=jax.devices()[:4])
  trainer.fit(data())
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line)["loss"] for line in f if '"loss"' in line]


@pytest.mark.parametrize("arch", ["bert", "gpt"])
def test_training_with_splash_matches_xla(arch, tmp_path):
  splash = _losses(arch, "splash", tmp_path / "splash")
  xla = _losses(arch, "xla", tmp_path / "xla")
  assert len(splash) == STEPS
  # Measured (2026-11-30): the same float32 losses at all 3 steps.
  np.testing.assert_allclose(splash, xla, rtol=0, atol=1e-5)


# ------------------------------------------------------------------- TPU compile


@needs_libtpu
@pytest.mark.parametrize("arch, impl", [("bert", "splash"), ("gpt", "auto")])
def test_tpu_train_step_runs_the_splash_kernel(arch, impl):
  # `auto` resolves from the mesh's (abstract TPU) devices, not from this CPU backend.
  config = _config(arch, impl)
  config.model.num_layers = 2
  config.train.batch_size = 16
  config.mesh.update(data=4, tensor=2)  # the 8 chips
  rep = compile_lib.report(config, "v5e-8")
  assert "tpu_custom_call" in rep["custom_calls"]
  assert rep["collectives"]["all-gather"]["count"] == 0  # each shard attends its own rows
