"""Trainer: parallel layouts agree, FSDP shards, resume is bitwise, schedule and mask."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from plmjax.config import base_config, validate
from plmjax.models import build_model
from plmjax.train import optimizer, sharding
from plmjax.train.objectives import PRETRAINING
from plmjax.train.trainer import Trainer
from synthetic import SyntheticBert

BATCH = 16


def tiny_config(steps=6, **mesh):
  c = base_config("bert")
  c.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=64,
                 max_position_embeddings=16, dropout_rate=0.0, attention_dropout_rate=0.0)
  c.data.max_seq_len = 16
  c.train.update(steps=steps, batch_size=BATCH, learning_rate=1e-2, warmup_steps=2,
                 log_every_steps=1)
  c.checkpoint.update(every_steps=100, async_save=False)
  c.mesh.update(**mesh)
  return c


def make_trainer(config, workdir, devices=None):
  model = build_model(validate(config), "pretraining")
  return Trainer(config, str(workdir), model, PRETRAINING["bert"], next(SyntheticBert(BATCH)),
                 flops_per_token=1.0, tokens_per_example=16, devices=devices)


def losses(workdir):
  import json
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line)["loss"] for line in f]


def test_data_parallel_and_fsdp_match_one_device(tmp_path):
  runs = {"one": (dict(data=1), jax.devices()[:1]), "dp": (dict(data=-1), None),
          "fsdp": (dict(data=2, fsdp=4), None)}
  curves, trainers = {}, {}
  for name, (mesh, devices) in runs.items():
    trainer = make_trainer(tiny_config(**mesh), tmp_path / name, devices)
    trainer.fit(SyntheticBert(BATCH))
    curves[name], trainers[name] = losses(tmp_path / name), trainer
  assert len(curves["one"]) == 6
  np.testing.assert_allclose(curves["dp"], curves["one"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(curves["fsdp"], curves["one"], atol=1e-5, rtol=0)
  # FSDP really shards: every device holds well under the full parameter bytes.
  full = sum(x.nbytes for x in jax.tree.leaves(trainers["one"].state["params"]))
  dp_bytes = sharding.bytes_per_device(trainers["dp"].state["params"])
  fsdp_bytes = sharding.bytes_per_device(trainers["fsdp"].state["params"])
  assert set(dp_bytes.values()) == {full}
  assert max(fsdp_bytes.values()) < 0.5 * full


def test_resume_is_bitwise_identical(tmp_path):
  straight = make_trainer(tiny_config(steps=8), tmp_path / "straight")
  straight.fit(SyntheticBert(BATCH))
  stopped = tiny_config(steps=8)
  stopped.train.stop_after_steps = 3
  first = make_trainer(stopped, tmp_path / "resumed")
  result = first.fit(SyntheticBert(BATCH))
  assert result.step == 3 and result.stopped_by == "train.stop_after_steps=3"
  second = make_trainer(tiny_config(steps=8), tmp_path / "resumed")
  assert second.fit(SyntheticBert(BATCH)).step == 8
  for a, b in zip(jax.tree.leaves(straight.state["params"]),
                  jax.tree.leaves(second.state["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def test_grad_accumulation_matches_full_batch(tmp_path):
  full = make_trainer(tiny_config(steps=3), tmp_path / "full")
  full.fit(SyntheticBert(BATCH))
  config = tiny_config(steps=3)
  config.train.grad_accum_steps = 2
  accum = make_trainer(config, tmp_path / "accum")
  accum.fit(SyntheticBert(BATCH))
  np.testing.assert_allclose(losses(tmp_path / "accum"), losses(tmp_path / "full"), atol=1e-5)


def test_learning_rate_schedule_values():
  c = base_config("bert").train
  c.update(steps=110, learning_rate=1.0, warmup_steps=10, end_learning_rate_ratio=0.0)
  linear = optimizer.learning_rate_schedule(c)
  assert [float(linear(s)) for s in (0, 5, 10, 60, 110)] == pytest.approx([0, 0.5, 1.0, 0.5, 0.0])
  c.decay = "cosine"
  cosine = optimizer.learning_rate_schedule(c)
  assert [float(cosine(s)) for s in (5, 10, 60, 110)] == pytest.approx([0.5, 1.0, 0.5, 0.0], abs=1e-6)
  c.update(decay="constant")
  assert float(optimizer.learning_rate_schedule(c)(100)) == pytest.approx(1.0)


def test_weight_decay_mask_excludes_exactly_biases_and_layernorm():
  config = tiny_config()
  model = build_model(validate(config), "pretraining")
  batch = next(SyntheticBert(2))
  from plmjax.train.step import model_inputs
  params = jax.eval_shape(lambda: nn.meta.unbox(model.init(
      jax.random.PRNGKey(0), batch["input_ids"], **model_inputs(batch))["params"]))
  mask = optimizer.weight_decay_mask(params)
  flat = {"/".join(p.key for p in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  for name, decays in flat.items():
    no_decay = name.endswith("/bias") or "LayerNorm" in name
    assert decays == (not no_decay), name
  assert flat["bert/embeddings/word_embeddings/embedding"]
  assert not flat["cls/predictions/bias"]


def test_bad_mesh_and_batch_are_clear_errors(tmp_path):
  from plmjax.errors import ConfigError
  with pytest.raises(ConfigError, match="needs 16 devices but 8"):
    make_trainer(tiny_config(data=16), tmp_path / "a")
  config = tiny_config()
  config.train.batch_size = 12
  with pytest.raises(ConfigError, match="not divisible by the 8 data-parallel devices"):
    make_trainer(config, tmp_path / "b")


def test_bfloat16_compute_keeps_float32_master_weights(tmp_path):
  config = tiny_config(steps=3)
  config.model.dtype = "bfloat16"
  trainer = make_trainer(config, tmp_path / "bf16")
  result = trainer.fit(SyntheticBert(BATCH))
  dtypes = {x.dtype for x in jax.tree.leaves(trainer.state["params"])}
  opt_dtypes = {x.dtype for x in jax.tree.leaves(trainer.state["opt_state"])
                if x.ndim > 0}
  assert dtypes == {np.dtype("float32")} and opt_dtypes == {np.dtype("float32")}
  assert np.isfinite(result.train_metrics["loss"])
  # The step really computes in bfloat16: its loss differs slightly from float32's.
  f32 = make_trainer(tiny_config(steps=3), tmp_path / "f32").fit(SyntheticBert(BATCH))
  assert result.train_metrics["loss"] != f32.train_metrics["loss"]
  assert abs(result.train_metrics["loss"] - f32.train_metrics["loss"]) < 0.05
