"""Tensor parallelism (mesh.tensor): whole heads per shard, Megatron's collectives, same losses.

GPT-2's fused c_attn is [embed, 3, heads, head_dim], so `heads` -> `tensor` gives each device
the q, k and v of its own heads; c_proj [heads, head_dim, embed] then sums the shards' partial
outputs. A layer costs one all-reduce in attention and one in the MLP (each way), as BERT's,
and no all-gather of activations.
"""

import importlib.util
import json

import jax
import numpy as np
import pytest

from plmjax.config import base_config, validate
from plmjax.models import build_model
from plmjax.train import compile as compile_lib
from plmjax.train.objectives import PRETRAINING
from plmjax.train.trainer import Trainer
from synthetic import Resumable, SyntheticBert

# The suite's on-disk compilation cache (conftest) cannot load compile-only executables.
pytestmark = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed: pip install 'plmjax[tpu]'")

BATCH, SEQ, VOCAB = 8, 32, 128


class SyntheticGpt(Resumable):
  """GPT batches of random tokens whose target is the token two back (learnable), resumable."""

  def __init__(self, batch_size=BATCH, seq_len=SEQ, vocab=VOCAB, seed=0):
    self.b, self.l, self.v, self.seed, self.index = batch_size, seq_len, vocab, seed, 0

  def make(self, rng):
    ids = rng.integers(1, self.v, (self.b, self.l)).astype(np.int32)
    weights = np.ones((self.b, self.l), np.float32)
    weights[:, :2] = 0.0
    return dict(input_ids=ids, targets=np.roll(ids, 2, axis=1), loss_weights=weights)


def tiny(arch: str, num_layers: int = 2, steps: int = 5, **mesh):
  c = base_config(arch)
  c.model.update(num_layers=num_layers, hidden_size=64, num_heads=4, intermediate_size=256,
                 vocab_size=VOCAB, max_position_embeddings=SEQ, dropout_rate=0.0,
                 attention_dropout_rate=0.0)
  c.data.update(max_seq_len=SEQ, max_predictions_per_seq=4)
  c.train.update(steps=steps, batch_size=BATCH, learning_rate=1e-2, warmup_steps=2,
                 log_every_steps=1)
  c.checkpoint.update(every_steps=100, async_save=False)
  c.mesh.update(**mesh)
  return c


def _batches(arch: str):
  return SyntheticGpt() if arch == "gpt" else SyntheticBert(BATCH, seq_len=SEQ, vocab=VOCAB)


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_tensor_parallel_losses_match_one_device(arch, tmp_path):
  runs = {"one": (dict(data=1), jax.devices()[:1]),
          "tp4": (dict(data=2, tensor=4), None), "tp2": (dict(data=4, tensor=2), None)}
  curves, trainers = {}, {}
  for name, (mesh, devices) in runs.items():
    config = tiny(arch, **mesh)
    head = "lm" if arch == "gpt" else "pretraining"
    trainer = Trainer(config, str(tmp_path / name), build_model(validate(config), head),
                      PRETRAINING[arch], next(_batches(arch)), flops_per_token=1.0,
                      tokens_per_example=SEQ, devices=devices)
    trainer.fit(_batches(arch))
    with open(tmp_path / name / "metrics.jsonl") as f:
      curves[name] = [json.loads(line)["loss"] for line in f]
    trainers[name] = trainer
  assert len(curves["one"]) == 5 and len(set(curves["one"])) == 5  # the updates change it
  np.testing.assert_allclose(curves["tp4"], curves["one"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(curves["tp2"], curves["one"], atol=1e-5, rtol=0)
  params = trainers["tp4"].state["params"]
  if arch == "gpt":  # each device holds one head of q, k and v (of 4) and its rows of c_proj
    attn = params["transformer"]["h_0"]["attn"]
    assert attn["c_attn"]["kernel"].sharding.shard_shape((64, 3, 4, 16)) == (64, 3, 1, 16)
    assert attn["c_proj"]["kernel"].sharding.shard_shape((4, 16, 64)) == (1, 16, 64)
  else:  # BERT's separate q/k/v: a quarter of the heads' columns, of the MLP's too
    layer = params["bert"]["encoder"]["layer_0"]
    query = layer["attention"]["self"]["query"]["kernel"]
    assert query.sharding.shard_shape(query.shape)[-1] * 4 == query.shape[-1]
    inter = layer["intermediate"]["dense"]["kernel"]
    assert inter.sharding.shard_shape(inter.shape) == (64, 64)


def _per_layer_growth(arch: str, topology: str, mesh: dict) -> tuple[dict, dict]:
  counts = {}
  for layers in (1, 2):
    rep = compile_lib.report(tiny(arch, num_layers=layers, **mesh), topology)
    counts[layers] = {k: v["count"] for k, v in rep["collectives"].items()}
  return counts[1], {k: counts[2][k] - counts[1][k] for k in counts[1]}


@pytest.mark.parametrize("topology, mesh", [
    ("cpu:8", dict(data=2, tensor=4)),
    pytest.param("v5e-8", dict(data=2, tensor=4), marks=needs_libtpu),
])
def test_a_layer_adds_all_reduces_only_as_in_megatron(topology, mesh):
  growth = {}
  for arch in ("gpt", "bert"):
    one_layer, growth[arch] = _per_layer_growth(arch, topology, mesh)
    # No activation is gathered or permuted between shards inside a layer ...
    assert growth[arch]["all-gather"] == 0, (arch, one_layer, growth[arch])
    assert growth[arch]["collective-permute"] == 0, (arch, one_layer, growth[arch])
    assert growth[arch]["all-to-all"] == 0, (arch, one_layer, growth[arch])
    # ... each layer sums partial outputs instead (attention and MLP, forward and backward).
    assert growth[arch]["all-reduce"] > 0, (arch, one_layer, growth[arch])
  assert growth["gpt"]["all-reduce"] == growth["bert"]["all-reduce"], growth
