"""float16 training: dynamic loss scaling with torch.amp.GradScaler's rule (jmp).

Faults come from outside, through hooks: `ScaleSpike` multiplies the loss scale for one
step (its gradients overflow) and takes its own factor back afterwards, so what is left
is the scaler's doing; `NanParams` makes one step's loss NaN.

The runs use attention dropout. Without it, float16 also takes the einsum path
(jax.nn.dot_product_attention asks for an F16_F16_F32 dot that XLA:CPU refuses), which
test_float16_evaluation_without_dropout_compiles_on_cpu checks.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from plmjax.config import validate
from plmjax.errors import ConfigError
from plmjax.train import hooks as hooks_lib
from plmjax.train.objectives import Objective
from plmjax.train.step import initial_loss_scale, make_train_step
from plmjax.train.trainer import NonFiniteError
from synthetic import SyntheticBert
from test_trainer import BATCH, losses, make_trainer, tiny_config

ONE = dict(data=1)  # one device: these runs are about numbers, not layouts


def fp16_config(steps=8, dtype="float16", **train):
  c = tiny_config(steps=steps, **ONE)
  c.model.update(dtype=dtype, attention_dropout_rate=0.1)
  c.train.update(loss_scale_init=1024.0, loss_scale_growth_interval=3, **train)
  return c


def rows(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def fit(config, workdir, hooks=()):
  trainer = make_trainer(config, workdir, jax.devices()[:1])
  return trainer, trainer.fit(SyntheticBert(BATCH), hooks=list(hooks))


def host_params(state):
  return jax.tree.map(np.asarray, jax.device_get(state["params"]))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """8 float16 steps, growth every 3: shared by the growth and resume tests."""
  workdir = tmp_path_factory.mktemp("straight")
  trainer, result = fit(fp16_config(), workdir)
  return workdir, host_params(trainer.state), result


def test_float16_tracks_float32_losses(tmp_path):
  curves = {}
  for dtype in ("float32", "float16"):
    c = fp16_config(steps=10, dtype=dtype)
    c.train.update(loss_scale_init=65536.0, loss_scale_growth_interval=2000)
    fit(c, tmp_path / dtype)
    curves[dtype] = np.array(losses(tmp_path / dtype))
  assert len(curves["float16"]) == 10
  # Measured 8e-5 (CPU, 2026-11); bfloat16's gap on the same run is 4e-4.
  np.testing.assert_allclose(curves["float16"], curves["float32"], atol=1e-3, rtol=0)
  assert not np.array_equal(curves["float16"], curves["float32"])  # really float16
  assert [r["loss_scale"] for r in rows(tmp_path / "float16")] == [65536.0] * 10
  assert "loss_scale" not in rows(tmp_path / "float32")[0]


def test_the_scale_doubles_after_growth_interval_finite_steps(straight):
  workdir, _, result = straight
  assert result.step == 8
  got = [(r["loss_scale"], r["overflow_steps"]) for r in rows(workdir)]
  assert got == [(1024.0, 0)] * 2 + [(2048.0, 0)] * 3 + [(4096.0, 0)] * 3


class ScaleSpike(hooks_lib.Hook):
  """Step `at` runs with the loss scale times 2**40 (its float16 gradients overflow);
  afterwards the hook divides its factor out again and keeps both steps' params."""

  FACTOR = 2.0**40

  def __init__(self, at: int):
    self.at, self.params = at, {}

  def _times(self, loop, factor):
    ls = loop.state["loss_scale"]
    loop.state = dict(loop.state, loss_scale=dict(ls, scale=ls["scale"] * factor))

  def after_step(self, loop):
    if loop.step in (self.at - 1, self.at):
      self.params[loop.step] = host_params(loop.state)
    if loop.step == self.at - 1:
      self._times(loop, self.FACTOR)
    elif loop.step == self.at:
      self.overflow = bool(loop.metrics["overflow"])
      self._times(loop, 1 / self.FACTOR)


def test_an_overflow_is_skipped_the_scale_halves_and_the_run_goes_on(straight, tmp_path):
  # Rows every 2 steps: the hook multiplies after step 3, which writes no row (hooks passed
  # to fit run before Metrics, so a row at step 3 would show the hook's factor).
  spike = ScaleSpike(at=4)
  _, result = fit(fp16_config(log_every_steps=2), tmp_path / "run", hooks=[spike])
  assert result.step == 8 and result.stopped_by is None
  assert spike.overflow
  for a, b in zip(jax.tree.leaves(spike.params[3]), jax.tree.leaves(spike.params[4])):
    np.testing.assert_array_equal(a, b)  # step 4 changed nothing
  got = rows(tmp_path / "run")
  assert [r["step"] for r in got] == [2, 4, 6, 8]
  # Step 4 ran at 2048 and halved it; growth counts again from there (straight: 1024,
  # 2048, 4096, 4096).
  assert [r["loss_scale"] for r in got] == [1024.0, 1024.0, 1024.0, 2048.0]
  assert [r["overflow_steps"] for r in got] == [0, 1, 0, 0]
  assert all(r["nonfinite_skipped"] == 0 for r in got)
  # The overflowing step's loss still counts (its forward pass was fine): row 4 is the
  # mean of steps 3 and 4, which match the straight run's.
  straight_losses = losses(straight[0])
  assert got[1]["loss"] == pytest.approx((straight_losses[2] + straight_losses[3]) / 2, abs=1e-6)
  assert got[-1]["loss"] != straight_losses[-1]


class NanParams(hooks_lib.Hook):
  """Step `at` computes on NaN parameters: its loss is NaN, whatever the scale."""

  def __init__(self, at: int):
    self.at = at

  def after_step(self, loop):
    if loop.step == self.at - 1:
      nan = jax.tree.map(lambda p: p * jnp.nan, loop.state["params"])
      loop.state = dict(loop.state, params=nan)


def test_a_nan_loss_is_not_the_scalers_business_and_stops_the_run(tmp_path):
  with pytest.raises(NonFiniteError, match="non-finite loss at step 3"):
    fit(fp16_config(), tmp_path / "run", hooks=[NanParams(at=3)])


def test_resume_is_bitwise_identical_under_float16(straight, tmp_path):
  workdir, params, _ = straight
  stopped = fp16_config()
  stopped.train.stop_after_steps = 4  # growth counter at 1 of 3: it must survive the resume
  _, first = fit(stopped, tmp_path / "resumed")
  assert first.step == 4
  meta = json.loads((tmp_path / "resumed" / "checkpoints" / "4" / "meta" / "metadata").read_text())
  assert meta["loss_scale"] == {"scale": 2048.0, "counter": 1}
  trainer, second = fit(fp16_config(), tmp_path / "resumed")
  assert second.step == 8
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(host_params(trainer.state))):
    np.testing.assert_array_equal(a, b)
  same = lambda w: [(r["loss"], r["grad_norm"], r["loss_scale"]) for r in rows(w)]
  assert same(tmp_path / "resumed") == same(workdir)


# ---- the rule itself, on a one-parameter model --------------------------------------------


class Sqrt:
  """loss = sum(sqrt(w)): finite at w = 0, where its gradient is infinite."""

  def apply(self, variables, input_ids, deterministic, rngs):
    return variables["params"]["w"]


SQRT = Objective(sums=lambda w, batch: dict(s=jnp.sqrt(w).sum()), totals=lambda batch: {},
                 loss=lambda sums, totals: sums["s"], finalize=lambda sums: sums)


@pytest.mark.parametrize("w, scale, want", [
    (1.0, 4.0, dict(scale=4.0, counter=6, finite=True, overflow=False, moved=True)),
    (0.0, 4.0, dict(scale=2.0, counter=0, finite=False, overflow=True, moved=False)),
    # At the minimum scale the scaler can do nothing more: a real non-finite step.
    (0.0, 1.0, dict(scale=1.0, counter=0, finite=False, overflow=False, moved=False)),
])
def test_overflow_rule(w, scale, want):
  cfg = ml_collections.ConfigDict(dict(grad_accum_steps=1, nonfinite="stop",
                                       loss_scale_growth_interval=2000))
  tx = optax.sgd(0.1)
  params = dict(w=jnp.full((3,), w))
  state = dict(step=jnp.int32(0), params=params, opt_state=tx.init(params),
               rng=jax.random.key_data(jax.random.PRNGKey(0)),
               loss_scale=initial_loss_scale(cfg, dict(scale=scale, counter=5)))
  new, metrics = jax.jit(make_train_step(Sqrt(), tx, SQRT, cfg))(
      state, dict(input_ids=jnp.zeros((1, 1), jnp.int32)))
  assert float(new["loss_scale"]["scale"]) == want["scale"]
  assert int(new["loss_scale"]["counter"]) == want["counter"]
  assert bool(metrics["finite"]) == want["finite"]
  assert bool(metrics["overflow"]) == want["overflow"]
  assert bool((new["params"]["w"] != w).any()) == want["moved"]
  assert np.isfinite(new["params"]["w"]).all()


def test_loss_scale_keys_are_checked():
  c = fp16_config()
  c.train.loss_scale_init = 0.5
  with pytest.raises(ConfigError, match="config.train.loss_scale_init=0.5"):
    validate(c)
  c = fp16_config()
  c.train.loss_scale_growth_interval = 0
  with pytest.raises(ConfigError, match="config.train.loss_scale_growth_interval=0"):
    validate(c)
  c = fp16_config()
  c.model.param_dtype = "float16"
  with pytest.raises(ConfigError, match="config.model.param_dtype='float16'"):
    validate(c)


def test_float16_evaluation_without_dropout_compiles_on_cpu():
  """The fused xla attention asks XLA:CPU for an f16 x f16 -> f32 dot it refuses; float16
  takes the einsum path, so evaluation (no dropout) works and matches float32 closely."""
  import jax
  import numpy as np
  from plmjax.config import base_config, validate
  from plmjax.models import build_model
  outs = {}
  for dtype in ("float32", "float16"):
    c = base_config("bert")
    c.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                   vocab_size=64, max_position_embeddings=16, dtype=dtype)
    c.data.max_seq_len = 16
    model = build_model(validate(c), "pretraining")
    ids = np.arange(32, dtype=np.int32).reshape(2, 16) % 64
    params = model.init(jax.random.PRNGKey(0), ids)
    outs[dtype] = jax.jit(lambda p, m=model: m.apply(
        p, ids, attention_mask=np.ones((2, 16), np.int32), deterministic=True))(params)
  np.testing.assert_allclose(outs["float16"]["mlm_logits"], outs["float32"]["mlm_logits"],
                             atol=2e-2)
