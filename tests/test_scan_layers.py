"""model.scan_layers: the layer stack under nn.scan equals the per-layer model on the same
(stacked) weights; training, KV-cache decoding, HF import/export and fine-tuning --init work."""

import dataclasses
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from hf_helpers import random_inputs, random_params, tiny_config
from plmjax import cli
from plmjax import workdir as workdir_lib
from plmjax.config import DEFAULT_AXIS_RULES, base_config, validate
from plmjax.errors import ConfigError
from plmjax.export import export as export_lib
from plmjax.finetune import finetune, tasks
from plmjax.generate import generate_ids
from plmjax.models import build_model, gpt
from plmjax.models.config import ModelConfig
from plmjax.models.transformer import match_layer_layout, stack_layers, unstack_layers
from plmjax.train import checkpoint
from plmjax.train.objectives import PRETRAINING
from plmjax.train.trainer import Trainer
from synthetic import SyntheticBert
from test_import_hf import hf_model, save

HEAD = {"bert": "pretraining", "gpt": "lm"}
STACK = {"bert": ("bert", "encoder", "layer"), "gpt": ("transformer", "h")}
LOGITS = {"bert": "mlm_logits", "gpt": "logits"}
N = 3


def _cfg(arch, **kw) -> ModelConfig:
  return tiny_config(arch, num_layers=N, dropout_rate=0.1, attention_dropout_rate=0.1,
                     remat="dots", **kw)


def _node(tree, path):
  for key in path:
    tree = tree[key]
  return tree


@pytest.fixture(scope="module", params=["bert", "gpt"])
def pair(request):
  """(arch, per-layer model, scanned model, per-layer params, the same stacked, inputs)."""
  arch = request.param
  cfg = _cfg(arch)
  params = random_params(cfg, HEAD[arch])
  return (arch, build_model(cfg, HEAD[arch]),
          build_model(dataclasses.replace(cfg, scan_layers=True), HEAD[arch]),
          params, stack_layers(params), random_inputs(cfg))


def _apply(model, arch, params, inputs, **kw):
  ids, types, mask = inputs
  if arch == "bert":
    return model.apply({"params": params}, ids, types, mask, **kw)
  return model.apply({"params": params}, ids, attention_mask=mask, **kw)


def test_scanned_tree_is_the_per_layer_tree_stacked(pair):
  arch, _, scanned, params, stacked, (ids, _, _) = pair
  boxed = jax.eval_shape(lambda: scanned.init(jax.random.key(0), ids))["params"]
  unboxed = nn.meta.unbox(boxed)
  assert jax.tree.structure(unboxed) == jax.tree.structure(stacked)
  assert jax.tree.map(lambda a: a.shape, unboxed) == jax.tree.map(np.shape, stacked)
  layer = _node(boxed, STACK[arch])
  leaves = jax.tree.leaves(layer, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(x.names[0] == "layers" and x.value.shape[0] == N for x in leaves)
  for leaf in leaves:  # the layer axis is not split; the others shard as before
    mesh_axes = nn.logical_to_mesh_axes(leaf.names, DEFAULT_AXIS_RULES)
    assert mesh_axes[0] is None
  assert f"{STACK[arch][-1]}_0" not in _node(unboxed, STACK[arch][:-1])
  # unstack(stack(p)) == p, bit for bit; both are no-ops on their own layout.
  back = unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert jax.tree.structure(stack_layers(stacked)) == jax.tree.structure(stacked)
  assert jax.tree.structure(unstack_layers(params)) == jax.tree.structure(params)
  assert (jax.tree.structure(match_layer_layout(params, unboxed))
          == jax.tree.structure(stacked))


def test_forward_and_gradients_match_per_layer_model(pair):
  arch, plain, scanned, params, stacked, inputs = pair
  want = jax.jit(lambda p: _apply(plain, arch, p, inputs))(params)
  got = jax.jit(lambda p: _apply(scanned, arch, p, inputs))(stacked)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], atol=2e-5, rtol=1e-5, err_msg=key)

  ids, _, mask = inputs
  def loss(model, p):  # next-token cross-entropy at real positions (remat=dots in the loop)
    logits = _apply(model, arch, p, inputs)[LOGITS[arch]][:, :-1]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1)[..., 0]
    return -(logp * mask[:, 1:]).sum() / mask[:, 1:].sum()
  want_l, want_g = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(params)
  got_l, got_g = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(stacked)
  np.testing.assert_allclose(got_l, want_l, rtol=1e-6)
  want_g = stack_layers(jax.tree.map(np.asarray, want_g))
  assert jax.tree.structure(got_g) == jax.tree.structure(want_g)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got_g)[0],
                          jax.tree.leaves(want_g)):
    np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
  # Every layer's slice of every stacked kernel got a gradient.
  kernels = [g for path, g in jax.tree_util.tree_flatten_with_path(_node(got_g, STACK[arch]))[0]
             if path[-1].key == "kernel"]
  assert all(np.any(np.asarray(g).reshape(N, -1) != 0, axis=1).all() for g in kernels)


def test_dropout_is_deterministic_in_the_rng(pair):
  arch, _, scanned, _, stacked, inputs = pair
  run = jax.jit(lambda key: _apply(scanned, arch, stacked, inputs, deterministic=False,
                                   rngs={"dropout": key})[LOGITS[arch]])
  a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
  assert np.array_equal(a, b)
  assert not np.allclose(a, c)
  clean = _apply(scanned, arch, stacked, inputs)[LOGITS[arch]]
  assert not np.allclose(a, clean)


def test_kv_cache_decoding_under_scan():
  """The cache is stacked along the layer axis; prefill + one-token steps give the logits of
  the per-layer model's full forward pass."""
  cfg = _cfg("gpt")
  params = random_params(cfg, "lm", seed=1)
  plain, scanned = gpt.GPT(cfg), gpt.GPT(dataclasses.replace(cfg, scan_layers=True))
  ids = np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 9)).astype(np.int32)
  want = plain.apply({"params": params}, ids)["logits"]

  cache = gpt.init_cache(scanned, 2, 9)
  attn = cache["transformer"]["h"]["attn"]
  assert attn["cached_key"].shape == (N, 2, 9, cfg.num_heads, cfg.head_dim)
  assert attn["cache_index"].shape == (N,)
  step = jax.jit(lambda p, c, x: scanned.apply({"params": p, "cache": c}, x, decode=True,
                                               mutable=["cache"]))
  stacked = stack_layers(params)
  out, mut = step(stacked, cache, ids[:, :6])
  got = [out["logits"]]
  for t in range(6, 9):
    out, mut = step(stacked, mut["cache"], ids[:, t:t + 1])
    got.append(out["logits"])
  np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=2e-5, rtol=1e-5)
  assert np.all(np.asarray(mut["cache"]["transformer"]["h"]["attn"]["cache_index"]) == 9)
  # plmjax generate's loops (left padding, beams regrouping the stacked cache) as they are.
  prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
  for kw in (dict(), dict(num_beams=3)):
    assert (generate_ids(scanned, stacked, prompts, max_new_tokens=4, eos_id=None, **kw)
            == generate_ids(plain, params, prompts, max_new_tokens=4, eos_id=None, **kw)), kw


@pytest.mark.parametrize("cls_name", ["BertForPreTraining", "GPT2LMHeadModel"])
def test_hf_import_export_round_trip_is_bit_exact_when_scanned(tmp_path, cls_name, capsys):
  src = save(hf_model(cls_name), tmp_path / "src")
  source = load_file(src / "model.safetensors")
  workdir, out = tmp_path / "run", tmp_path / "hf_out"
  assert cli.main(["import-hf", "--model", str(src), "--workdir", str(workdir),
                   "--config.model.scan_layers=true"]) == 0
  # The report counts Hugging Face's tensors, the stacked ones per layer, as unscanned.
  scanned_report = capsys.readouterr().out
  assert cli.main(["import-hf", "--model", str(src), "--workdir", str(tmp_path / "flat")]) == 0
  count = lambda out: int(re.search(r"imported (\d+) tensors", out)[1])
  assert count(scanned_report) == count(capsys.readouterr().out) > 10
  config = workdir_lib.read_config(str(workdir))
  assert config.model.scan_layers is True
  params, _ = checkpoint.load_params(str(workdir))
  arch = config.model.arch
  stack = _node(params, STACK[arch])  # stored stacked: one tensor per kind, leading axis 2
  assert all(np.shape(x)[0] == 2 for x in jax.tree.leaves(stack))
  export_lib.export(str(workdir), str(out))
  exported = load_file(out / "model.safetensors")
  assert set(exported) == set(source)
  for name, value in source.items():
    assert exported[name].dtype == value.dtype and exported[name].tobytes() == value.tobytes(), name


def _trainer_config(scan: bool):
  c = base_config("bert")
  c.model.update(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=64,
                 max_position_embeddings=16, dropout_rate=0.0, attention_dropout_rate=0.0,
                 remat="dots", scan_layers=scan)
  c.data.max_seq_len = 16
  c.train.update(steps=3, batch_size=16, learning_rate=1e-2, warmup_steps=1, log_every_steps=1)
  c.checkpoint.update(every_steps=100, async_save=False)
  c.mesh.update(data=2, fsdp=4)
  return c


def _losses(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line)["loss"] for line in f]


def test_training_scanned_matches_per_layer_and_its_workdir_loads(tmp_path):
  """Trainer steps (FSDP over 8 devices, remat) from the same weights: the same losses. The
  scanned workdir then exports per layer and is a fine-tuning --init."""
  start = random_params(ModelConfig.from_config(_trainer_config(False).model), "pretraining")
  results = {}
  for scan in (False, True):
    config = _trainer_config(scan)
    model = build_model(validate(config), "pretraining")
    workdir = tmp_path / ("scan" if scan else "plain")
    trainer = Trainer(config, str(workdir), model, PRETRAINING["bert"], next(SyntheticBert(16)),
                      flops_per_token=1.0, tokens_per_example=16,
                      init_params=lambda abstract: match_layer_layout(start, abstract))
    trainer.fit(SyntheticBert(16))
    workdir_lib.write_config(str(workdir), config)
    results[scan] = (_losses(workdir), jax.device_get(trainer.state["params"]))
  assert len(results[True][0]) == 3
  np.testing.assert_allclose(results[True][0], results[False][0], atol=1e-5, rtol=0)
  trained = results[True][1]
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(stack_layers(results[False][1]))):
    np.testing.assert_allclose(a, b, atol=1e-5)

  # export: Hugging Face's per-layer names, the trained values.
  export_lib.export(str(tmp_path / "scan"), str(tmp_path / "hf"))
  exported = load_file(tmp_path / "hf" / "model.safetensors")
  query = "bert.encoder.layer.1.attention.self.query.weight"
  np.testing.assert_array_equal(
      exported[query], np.asarray(trained["bert"]["encoder"]["layer"]["attention"]["self"]
                                  ["query"]["kernel"][1]).T)
  assert not any(".layer.attention" in name for name in exported)

  # fine-tuning --init: the model section (scan_layers too) and the encoder come from it.
  ft = finetune.prepare_config(tasks.finetune_config(type="classification"),
                               str(tmp_path / "scan"))
  assert ft.model.scan_layers is True
  cfg = ModelConfig.from_config(ft.model)
  cls_model = build_model(cfg, ft.task.head)
  abstract = nn.meta.unbox(jax.eval_shape(
      lambda: cls_model.init(jax.random.key(0), np.ones((1, 2), np.int32)))["params"])
  params = finetune.pretrained_params(str(tmp_path / "scan"), cfg)(abstract)
  for a, b in zip(jax.tree.leaves(params["bert"]["encoder"]),
                  jax.tree.leaves(trained["bert"]["encoder"])):
    np.testing.assert_array_equal(a, b)


def test_config_errors_name_the_key():
  with pytest.raises(ConfigError, match=r"config.model.scan_layers='yes' is not allowed"):
    ModelConfig(arch="bert", scan_layers="yes")
  with pytest.raises(ConfigError, match="scan_layers=true is for arch bert and gpt"):
    ModelConfig(arch="t5", scan_layers=True)
