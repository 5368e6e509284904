"""GPT-2: parameter-tree contract, causality, packing, padding, KV-cache decoding."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plmjax.config import DEFAULT_AXIS_RULES
from plmjax.errors import ConfigError
from plmjax.models import HEADS, build_model, gpt
from plmjax.models.config import ModelConfig

CFG = ModelConfig(arch="gpt", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                  intermediate_size=64, max_position_embeddings=32, layer_norm_eps=1e-5)
B, L = 2, 8


def _ids(seed=0, shape=(B, L)):
  return jax.random.randint(jax.random.key(seed), shape, 1, CFG.vocab_size)


def _jit(model):
  return jax.jit(model.apply, static_argnames=("deterministic", "decode", "mutable"))


@pytest.fixture(scope="module")
def lm():
  model = gpt.GPT(CFG)
  boxed = jax.jit(model.init)(jax.random.key(0), _ids())["params"]
  return model, _jit(model), boxed, nn.meta.unbox(boxed)


def test_param_tree_matches_contract(lm):
  _, _, boxed, params = lm
  paths = {"/".join(str(k.key) for k in path): leaf.shape
           for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  d, i, h3k = CFG.hidden_size, CFG.intermediate_size, (3, CFG.num_heads, CFG.head_dim)
  want = {
      "transformer/wte/embedding": (CFG.vocab_size, d),
      "transformer/wpe/embedding": (CFG.max_position_embeddings, d),
      "transformer/ln_f/scale": (d,), "transformer/ln_f/bias": (d,),
  }
  for n in range(2):
    h = f"transformer/h_{n}"
    want.update({
        f"{h}/ln_1/scale": (d,), f"{h}/ln_1/bias": (d,),
        f"{h}/attn/c_attn/kernel": (d, *h3k), f"{h}/attn/c_attn/bias": h3k,
        f"{h}/attn/c_proj/kernel": (CFG.num_heads, CFG.head_dim, d), f"{h}/attn/c_proj/bias": (d,),
        f"{h}/ln_2/scale": (d,), f"{h}/ln_2/bias": (d,),
        f"{h}/mlp/c_fc/kernel": (d, i), f"{h}/mlp/c_fc/bias": (i,),
        f"{h}/mlp/c_proj/kernel": (i, d), f"{h}/mlp/c_proj/bias": (d,),
    })
  assert paths == want
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    mesh_axes = [a for a in nn.logical_to_mesh_axes(leaf.names, DEFAULT_AXIS_RULES) if a]
    assert len(mesh_axes) == len(set(mesh_axes)), leaf.names
  # Whole heads shard over `tensor` (Megatron), not the fused q|k|v columns.
  attn = boxed["transformer"]["h_0"]["attn"]
  assert attn["c_attn"]["kernel"].names == ("embed", "qkv", "heads", "kv")
  assert attn["c_attn"]["bias"].names == ("qkv", "heads", "kv")
  assert attn["c_proj"]["kernel"].names == ("heads", "kv", "embed")


def test_residual_projections_use_scaled_init(lm):
  _, _, _, params = lm
  h = params["transformer"]["h_0"]
  scaled = CFG.initializer_range / np.sqrt(2 * CFG.num_layers)
  np.testing.assert_allclose(np.std(h["mlp"]["c_proj"]["kernel"]), scaled, rtol=0.15)
  np.testing.assert_allclose(np.std(h["attn"]["c_proj"]["kernel"]), scaled, rtol=0.15)
  np.testing.assert_allclose(np.std(h["mlp"]["c_fc"]["kernel"]), CFG.initializer_range, rtol=0.15)
  assert not np.any(h["attn"]["c_attn"]["bias"])
  np.testing.assert_array_equal(h["ln_1"]["scale"], 1.0)


def test_shapes_dtypes_and_tied_head(lm):
  _, apply, _, params = lm
  out = apply({"params": params}, _ids())
  assert out["logits"].shape == (B, L, CFG.vocab_size) and out["logits"].dtype == jnp.float32
  assert out["hidden"].shape == (B, L, CFG.hidden_size)
  wte = params["transformer"]["wte"]["embedding"]
  np.testing.assert_allclose(out["logits"], out["hidden"] @ wte.T, atol=1e-5)


def test_causality_future_positions_get_zero_gradient(lm):
  model, _, _, params = lm
  ids = _ids(shape=(1, L))

  # Position j's embedding row wpe[j] is used by token j alone, so d hidden_i / d wpe[j]
  # is the gradient with respect to that token's input embedding.
  def hidden_of(wpe):
    p = {**params, "transformer": {**params["transformer"], "wpe": {"embedding": wpe}}}
    return model.apply({"params": p}, ids)["hidden"][0]

  wpe = params["transformer"]["wpe"]["embedding"]
  _, vjp = jax.vjp(hidden_of, wpe)
  cotangents = jnp.eye(L)[:, :, None] * jnp.ones((1, 1, CFG.hidden_size))
  grads_IxPxD = jax.jit(jax.vmap(lambda c: vjp(c)[0]))(cotangents)
  norms_IxJ = np.abs(np.asarray(grads_IxPxD[:, :L])).sum(-1)
  future = np.triu(np.ones((L, L), bool), k=1)
  assert np.all(norms_IxJ[future] == 0.0)
  assert np.all(norms_IxJ[~future] > 0.0)


def test_padding_does_not_change_real_positions(lm):
  _, apply, _, params = lm
  ids = _ids(shape=(1, 5))
  base = apply({"params": params}, ids)["logits"]
  # Right padding: causality alone protects the real positions.
  right = jnp.concatenate([ids, jnp.full((1, 3), 7)], axis=1)
  out = apply({"params": params}, right,
              attention_mask=jnp.array([[1] * 5 + [0] * 3]))["logits"]
  np.testing.assert_allclose(out[:, :5], base, atol=1e-5)
  # Left padding needs the mask and the shifted positions.
  left = jnp.concatenate([jnp.full((1, 3), 7), ids], axis=1)
  out = apply({"params": params}, left, attention_mask=jnp.array([[0] * 3 + [1] * 5]),
              position_ids=jnp.array([[0, 0, 0, 0, 1, 2, 3, 4]]))["logits"]
  np.testing.assert_allclose(out[:, 3:], base, atol=1e-5)


def test_segment_ids_keep_packed_documents_apart(lm):
  _, apply, _, params = lm
  a, b = _ids(1, (1, 3)), _ids(2, (1, 5))
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.array([[1] * 3 + [2] * 5])
  pos = jnp.array([[0, 1, 2, 0, 1, 2, 3, 4]])
  out = apply({"params": params}, packed, segment_ids=seg, position_ids=pos)["logits"]
  np.testing.assert_allclose(out[:, 3:], apply({"params": params}, b)["logits"], atol=1e-5)
  np.testing.assert_allclose(out[:, :3], apply({"params": params}, a)["logits"], atol=1e-5)
  # Without segment ids the second document sees the first.
  mixed = apply({"params": params}, packed, position_ids=pos)["logits"]
  assert not np.allclose(mixed[:, 3:], out[:, 3:], atol=1e-3)


def test_kv_cache_decode_matches_full_forward(lm):
  model, apply, _, params = lm
  ids = _ids(3, (B, L))
  full = apply({"params": params}, ids)["logits"]
  max_len = 12
  cache = gpt.init_cache(model, B, max_len)
  assert cache["transformer"]["h_0"]["attn"]["cached_key"].shape == (
      B, max_len, CFG.num_heads, CFG.head_dim)

  # Token by token from an empty cache.
  steps, c = [], cache
  for t in range(L):
    out, mut = apply({"params": params, "cache": c}, ids[:, t:t + 1], decode=True,
                     mutable=("cache",))
    c = mut["cache"]
    steps.append(out["logits"][:, 0])
  np.testing.assert_allclose(jnp.stack(steps, 1), full, atol=1e-5)
  assert int(c["transformer"]["h_1"]["attn"]["cache_index"]) == L

  # Prefill a 5-token prompt, then one token at a time.
  out, mut = apply({"params": params, "cache": cache}, ids[:, :5], decode=True,
                   mutable=("cache",))
  np.testing.assert_allclose(out["logits"], full[:, :5], atol=1e-5)
  c = mut["cache"]
  for t in range(5, L):
    out, mut = apply({"params": params, "cache": c}, ids[:, t:t + 1], decode=True,
                     mutable=("cache",))
    c = mut["cache"]
    np.testing.assert_allclose(out["logits"][:, 0], full[:, t], atol=1e-5)


def test_kv_cache_with_left_padded_prompt(lm):
  model, apply, _, params = lm
  ids = _ids(4, (1, 6))
  full = apply({"params": params}, ids)["logits"]
  # Row 0: the 6 tokens; row 1: 2 pads + the first 4 of them (a shorter prompt).
  prompt = jnp.concatenate([ids[:, :6], jnp.concatenate([jnp.full((1, 2), 9), ids[:, :4]], 1)])
  mask = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1]])
  pos = jnp.array([list(range(6)), [0, 0, 0, 1, 2, 3]])
  cache = gpt.init_cache(model, 2, 8)
  out, mut = apply({"params": params, "cache": cache}, prompt, attention_mask=mask,
                   position_ids=pos, decode=True, mutable=("cache",))
  np.testing.assert_allclose(out["logits"][0], full[0], atol=1e-5)
  np.testing.assert_allclose(out["logits"][1, 2:], full[0, :4], atol=1e-5)
  # Next token: row 1 continues with ids[4] at its own position 4.
  nxt = jnp.array([[5], [int(ids[0, 4])]])
  out, _ = apply({"params": params, "cache": mut["cache"]}, nxt,
                 position_ids=jnp.array([[6], [4]]), decode=True, mutable=("cache",))
  np.testing.assert_allclose(out["logits"][1, 0], full[0, 4], atol=1e-5)


def test_bfloat16_compute_close_to_float32(lm):
  _, apply, _, params = lm
  ids = _ids()
  ref = apply({"params": params}, ids)["logits"]
  out = _jit(gpt.GPT(dataclasses.replace(CFG, dtype="bfloat16")))({"params": params}, ids)
  assert out["logits"].dtype == jnp.float32 and out["hidden"].dtype == jnp.bfloat16
  np.testing.assert_allclose(out["logits"], ref, atol=0.1)


def test_remat_variants_and_dropout(lm):
  _, _, _, params = lm
  ids = _ids()

  def loss_and_grad(remat, deterministic=True):
    model = gpt.GPT(dataclasses.replace(CFG, remat=remat))

    def loss(p):
      out = model.apply({"params": p}, ids, deterministic=deterministic,
                        rngs={"dropout": jax.random.key(1)})
      return jnp.mean(out["logits"] ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  ref_loss, ref_grad = loss_and_grad("none")
  for remat in ("full", "dots"):
    value, grad = loss_and_grad(remat)
    np.testing.assert_allclose(value, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grad, ref_grad)
  # Dropout (and the einsum attention path) under remat: the same key gives the same mask.
  drop_loss, _ = loss_and_grad("none", deterministic=False)
  drop_remat_loss, _ = loss_and_grad("full", deterministic=False)
  assert not np.isclose(drop_loss, ref_loss)
  np.testing.assert_allclose(drop_remat_loss, drop_loss, rtol=1e-6)


def test_param_count_matches_hugging_face_gpt2():
  import torch  # test extra; imported here to keep the other tests fast to collect
  import transformers
  with torch.device("meta"):
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config())
  hf_count = sum(p.numel() for p in hf.parameters())  # lm_head is wte, counted once
  cfg = ModelConfig(arch="gpt", vocab_size=50257, max_position_embeddings=1024,
                    layer_norm_eps=1e-5)
  abstract = jax.eval_shape(gpt.GPT(cfg).init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))
  count = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(abstract["params"])))
  assert count == hf_count == 124_439_808


def test_build_model_gpt_heads():
  assert set(HEADS["gpt"]) == {"lm"}
  assert isinstance(build_model(CFG, "lm"), gpt.GPT)
  with pytest.raises(ConfigError, match="'lm'|lm"):
    build_model(CFG, "pretraining")
