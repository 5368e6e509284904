"""BERT: shapes of every head, the parameter-tree contract, masks, precision, remat."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plmjax.config import DEFAULT_AXIS_RULES
from plmjax.errors import ConfigError
from plmjax.models import HEADS, bert, build_model
from plmjax.models.config import ModelConfig

CFG = ModelConfig(arch="bert", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
B, L = 2, 8
ALLOWED_AXES = {"vocab", "embed", "heads", "mlp", "position", "type", "norm", "classes",
                "embed_out"}


def _ids(seed=0, shape=(B, L)):
  return jax.random.randint(jax.random.key(seed), shape, 1, CFG.vocab_size)


def _jit(model):
  """Jitted apply: one compilation per input shape beats op-by-op dispatch here."""
  return jax.jit(model.apply, static_argnames=("deterministic",))


@pytest.fixture(scope="module")
def pretraining():
  model = bert.BertForPreTraining(CFG)
  boxed = jax.jit(model.init)(jax.random.key(0), _ids())["params"]
  return _jit(model), boxed, nn.meta.unbox(boxed)


def _paths(tree):
  return {"/".join(str(k.key) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_pretraining_param_tree_matches_contract(pretraining):
  _, _, params = pretraining
  want = {
      "bert/embeddings/word_embeddings/embedding", "bert/embeddings/position_embeddings/embedding",
      "bert/embeddings/token_type_embeddings/embedding", "bert/embeddings/LayerNorm/scale",
      "bert/embeddings/LayerNorm/bias", "bert/pooler/dense/kernel", "bert/pooler/dense/bias",
      "cls/predictions/transform/dense/kernel", "cls/predictions/transform/dense/bias",
      "cls/predictions/transform/LayerNorm/scale", "cls/predictions/transform/LayerNorm/bias",
      "cls/predictions/bias", "cls/seq_relationship/kernel", "cls/seq_relationship/bias",
  }
  for i in range(2):
    p = f"bert/encoder/layer_{i}"
    for n in ("query", "key", "value"):
      want |= {f"{p}/attention/self/{n}/kernel", f"{p}/attention/self/{n}/bias"}
    want |= {f"{p}/attention/output/dense/kernel", f"{p}/attention/output/dense/bias",
             f"{p}/attention/output/LayerNorm/scale", f"{p}/attention/output/LayerNorm/bias",
             f"{p}/intermediate/dense/kernel", f"{p}/intermediate/dense/bias",
             f"{p}/output/dense/kernel", f"{p}/output/dense/bias",
             f"{p}/output/LayerNorm/scale", f"{p}/output/LayerNorm/bias"}
  assert _paths(params) == want
  d, v, i = CFG.hidden_size, CFG.vocab_size, CFG.intermediate_size
  shapes = {
      "bert/embeddings/word_embeddings/embedding": (v, d),
      "bert/embeddings/position_embeddings/embedding": (CFG.max_position_embeddings, d),
      "bert/embeddings/token_type_embeddings/embedding": (CFG.type_vocab_size, d),
      "bert/encoder/layer_1/attention/self/query/kernel": (d, d),
      "bert/encoder/layer_1/intermediate/dense/kernel": (d, i),
      "bert/encoder/layer_1/output/dense/kernel": (i, d),
      "cls/predictions/bias": (v,), "cls/seq_relationship/kernel": (d, 2),
  }
  for path, shape in shapes.items():
    node = params
    for k in path.split("/"):
      node = node[k]
    assert node.shape == shape, path
    assert node.dtype == jnp.float32


@pytest.mark.parametrize("head,top,extra", [
    ("mlm", {"bert", "cls"}, {"cls/predictions/bias"}),
    ("sequence_classification", {"bert", "classifier"}, {"bert/pooler/dense/kernel"}),
    ("token_classification", {"bert", "classifier"}, set()),
    ("question_answering", {"bert", "qa_outputs"}, set()),
])
def test_heads_shapes_and_top_level_params(head, top, extra):
  model = build_model(CFG, head)
  ids = _ids()
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), ids)["params"])
  assert set(params) == top
  paths = _paths(params)
  assert extra <= paths
  has_pooler = any(p.startswith("bert/pooler") for p in paths)
  assert has_pooler == (head == "sequence_classification")
  assert not any(p.startswith("cls/seq_relationship") for p in paths)
  out = _jit(model)({"params": params}, ids)
  want = {
      "mlm": {"mlm_logits": (B, L, CFG.vocab_size)},
      "sequence_classification": {"logits": (B, CFG.num_labels)},
      "token_classification": {"logits": (B, L, CFG.num_labels)},
      "question_answering": {"start_logits": (B, L), "end_logits": (B, L)},
  }[head]
  assert set(out) == set(want) | {"hidden"}
  for key, shape in want.items():
    assert out[key].shape == shape and out[key].dtype == jnp.float32, key
  assert out["hidden"].shape == (B, L, CFG.hidden_size)


def test_logical_axis_names_on_every_param(pretraining):
  _, boxed, _ = pretraining
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert set(leaf.names) <= ALLOWED_AXES, leaf.names
    assert len(leaf.names) == leaf.value.ndim
    mesh_axes = [a for a in nn.logical_to_mesh_axes(leaf.names, DEFAULT_AXIS_RULES) if a]
    assert len(mesh_axes) == len(set(mesh_axes)), leaf.names


def test_pretraining_shapes_masked_and_cls_positions(pretraining):
  apply, _, params = pretraining
  ids = _ids()
  full = apply({"params": params}, ids)
  assert full["mlm_logits"].shape == (B, L, CFG.vocab_size)
  assert full["nsp_logits"].shape == (B, 2) and full["nsp_logits"].dtype == jnp.float32
  positions = jnp.array([[1, 3, 7], [0, 0, 5]])
  part = apply({"params": params}, ids, masked_positions=positions)
  assert part["mlm_logits"].shape == (B, 3, CFG.vocab_size)
  want = np.take_along_axis(np.asarray(full["mlm_logits"]), np.asarray(positions)[..., None], 1)
  np.testing.assert_allclose(part["mlm_logits"], want, atol=1e-5)
  np.testing.assert_allclose(part["nsp_logits"], full["nsp_logits"], atol=1e-6)
  # Pooling at cls_positions: position 0 gives the default NSP logits.
  cls = apply({"params": params}, ids, cls_positions=jnp.array([[0, 4]] * B))
  assert cls["nsp_logits"].shape == (B, 2, 2)
  np.testing.assert_allclose(cls["nsp_logits"][:, 0], full["nsp_logits"], atol=1e-6)


def test_bert_model_without_pooler_has_no_pooled():
  model = bert.BertModel(CFG, add_pooling_layer=False)
  out, _ = model.init_with_output(jax.random.key(0), _ids())
  assert set(out) == {"hidden"}


def test_padding_does_not_change_real_positions(pretraining):
  apply, _, params = pretraining
  ids = _ids(shape=(B, 6))
  types = jnp.array([[0, 0, 0, 1, 1, 1]] * B)
  base = apply({"params": params}, ids, types)
  padded_ids = jnp.concatenate([ids, jnp.zeros((B, 3), jnp.int32) + 5], axis=1)
  padded_types = jnp.concatenate([types, jnp.zeros((B, 3), jnp.int32)], axis=1)
  mask = jnp.concatenate([jnp.ones((B, 6), jnp.int32), jnp.zeros((B, 3), jnp.int32)], axis=1)
  padded = apply({"params": params}, padded_ids, padded_types, mask)
  np.testing.assert_allclose(padded["hidden"][:, :6], base["hidden"], atol=1e-5)
  np.testing.assert_allclose(padded["nsp_logits"], base["nsp_logits"], atol=1e-5)
  # Without the mask the pads are attended to and the outputs move.
  unmasked = apply({"params": params}, padded_ids, padded_types)
  assert not np.allclose(unmasked["hidden"][:, :6], base["hidden"], atol=1e-3)


def test_segment_ids_keep_packed_sequences_apart(pretraining):
  apply, _, params = pretraining
  a, b = _ids(1, (1, 5)), _ids(2, (1, 4))
  pad = jnp.zeros((1, 3), jnp.int32)
  packed = jnp.concatenate([a, b, pad], axis=1)
  seg = jnp.array([[1] * 5 + [2] * 4 + [0] * 3])
  pos = jnp.array([list(range(5)) + list(range(4)) + [0] * 3])
  cls = jnp.array([[0, 5]])
  out = apply({"params": params}, packed, segment_ids=seg, position_ids=pos,
                    cls_positions=cls)
  alone_a = apply({"params": params}, a)
  alone_b = apply({"params": params}, b)
  np.testing.assert_allclose(out["hidden"][:, :5], alone_a["hidden"], atol=1e-5)
  np.testing.assert_allclose(out["hidden"][:, 5:9], alone_b["hidden"], atol=1e-5)
  np.testing.assert_allclose(out["nsp_logits"][:, 0], alone_a["nsp_logits"], atol=1e-5)
  np.testing.assert_allclose(out["nsp_logits"][:, 1], alone_b["nsp_logits"], atol=1e-5)
  # Changing segment 2's tokens leaves segment 1 untouched.
  changed = packed.at[:, 5:9].set(_ids(3, (1, 4)))
  out2 = apply({"params": params}, changed, segment_ids=seg, position_ids=pos)
  np.testing.assert_array_equal(out2["hidden"][:, :5], out["hidden"][:, :5])
  assert not np.allclose(out2["hidden"][:, 5:9], out["hidden"][:, 5:9], atol=1e-3)


def test_bfloat16_compute_close_to_float32(pretraining):
  apply, _, params = pretraining
  model16 = bert.BertForPreTraining(dataclasses.replace(CFG, dtype="bfloat16"))
  ids = _ids()
  ref = apply({"params": params}, ids)
  out = _jit(model16)({"params": params}, ids)
  assert out["mlm_logits"].dtype == jnp.float32 and out["nsp_logits"].dtype == jnp.float32
  assert out["hidden"].dtype == jnp.bfloat16
  np.testing.assert_allclose(out["mlm_logits"], ref["mlm_logits"], atol=0.1)
  np.testing.assert_allclose(out["hidden"].astype(jnp.float32), ref["hidden"], atol=0.1)
  # bf16 params are a policy too: the tree keeps the param dtype given.
  abstract = jax.eval_shape(model16.init, jax.random.key(0), ids)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(abstract["params"])))


def test_remat_variants_give_same_outputs_and_grads(pretraining):
  _, _, params = pretraining
  ids = _ids()

  def loss_and_grad(remat):
    model = bert.BertForPreTraining(dataclasses.replace(CFG, remat=remat))

    def loss(p):
      out = model.apply({"params": p}, ids)
      return out["mlm_logits"].mean() + out["nsp_logits"].mean()
    return jax.jit(jax.value_and_grad(loss))(params)

  ref_loss, ref_grad = loss_and_grad("none")
  for remat in ("full", "dots"):
    value, grad = loss_and_grad(remat)
    np.testing.assert_allclose(value, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grad, ref_grad)


def test_dropout_is_active_only_when_not_deterministic(pretraining):
  apply, _, params = pretraining
  ids = _ids()
  ref = apply({"params": params}, ids)
  d1 = apply({"params": params}, ids, deterministic=False,
                   rngs={"dropout": jax.random.key(1)})
  d2 = apply({"params": params}, ids, deterministic=False,
                   rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(d1["hidden"], ref["hidden"], atol=1e-3)
  assert not np.allclose(d1["hidden"], d2["hidden"], atol=1e-3)


def test_param_count_matches_hugging_face_bert_base():
  import torch  # test extra; imported here to keep the other tests fast to collect
  import transformers
  with torch.device("meta"):  # shapes only, no 440 MB of weights
    hf = transformers.BertForPreTraining(transformers.BertConfig())
  hf_count = sum(p.numel() for p in hf.parameters())  # tied tensors appear once
  model = bert.BertForPreTraining(ModelConfig())  # defaults are bert-base-uncased
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))
  count = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(abstract["params"])))
  assert count == hf_count == 110_106_428


def test_build_model_and_config_errors():
  assert set(HEADS["bert"]) == {"pretraining", "mlm", "sequence_classification",
                                "token_classification", "question_answering"}
  assert isinstance(build_model(CFG, "pretraining"), bert.BertForPreTraining)
  with pytest.raises(ConfigError, match="pretraining"):
    build_model(CFG, "lm")
  with pytest.raises(ConfigError, match="num_heads"):
    ModelConfig(hidden_size=30, num_heads=4)
  with pytest.raises(ConfigError, match="remat"):
    ModelConfig(remat="sometimes")


def test_sharded_init_and_forward_on_a_mesh():
  """8 CPU devices as data x fsdp x tensor = 2x2x2, with the default axis rules."""
  # The vocab axis is sharded over `tensor`, so it must divide evenly.
  model = bert.BertForPreTraining(dataclasses.replace(CFG, vocab_size=96))
  ids = _ids(shape=(4, L))
  ref = jax.jit(lambda ids: model.apply(model.init(jax.random.key(0), ids), ids))(ids)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_AXIS_RULES):
    abstract = jax.eval_shape(model.init, jax.random.key(0), ids)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh,
                                            DEFAULT_AXIS_RULES)
    sharded = nn.meta.unbox(jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), ids))
    query = sharded["params"]["bert"]["encoder"]["layer_0"]["attention"]["self"]["query"]
    assert query["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    out = jax.jit(model.apply)(sharded, jax.device_put(ids, batch))
  # Activations carry the batch sharding (with_logical_constraint), and the values match.
  assert out["hidden"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  np.testing.assert_allclose(out["mlm_logits"], ref["mlm_logits"], atol=1e-5)
