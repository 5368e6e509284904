"""T5 model: parity with Hugging Face PyTorch on the same weights, bias buckets, the KV
cache, the parameter tree's axis names, precision, and config checks."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from plmjax.config import load_config, validate
from plmjax.errors import ConfigError
from plmjax.export import t5_weights
from plmjax.export.hf_weights import unflatten
from plmjax.models import build_model, t5, t5_layers
from plmjax.models.config import ModelConfig

VARIANTS = [("relu", True), ("relu", False), ("gated-gelu", True), ("gated-gelu", False)]


def hf_t5(feed_forward_proj: str, tied: bool, seed: int = 0, **kw):
  """A random HF T5 (layer norms and, untied, lm_head perturbed away from the init)."""
  values = dict(vocab_size=83, d_model=24, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=3,
                num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                feed_forward_proj=feed_forward_proj, tie_word_embeddings=tied, dropout_rate=0.0)
  values.update(kw)
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(**values))
  model.config._attn_implementation = "eager"
  with torch.no_grad():
    if not tied:  # transformers 5 ties them at construction; a file with its own head unties
      model.lm_head.weight = torch.nn.Parameter(0.1 * torch.randn_like(model.shared.weight))
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def plmjax_config(hf: transformers.T5Config, **kw) -> ModelConfig:
  values = dict(arch="t5", vocab_size=hf.vocab_size, hidden_size=hf.d_model,
                attention_head_dim=hf.d_kv, intermediate_size=hf.d_ff, num_layers=hf.num_layers,
                num_decoder_layers=hf.num_decoder_layers, num_heads=hf.num_heads,
                relative_attention_num_buckets=hf.relative_attention_num_buckets,
                relative_attention_max_distance=hf.relative_attention_max_distance,
                feed_forward_proj=hf.feed_forward_proj,
                tie_word_embeddings=hf.scale_decoder_outputs, layer_norm_eps=1e-6,
                initializer_range=1.0, dropout_rate=0.0, attention_dropout_rate=0.0)
  values.update(kw)
  return ModelConfig(**values)


def abstract_params(model):
  ids = np.ones((1, 2), np.int32)
  return nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"])


def params_from_hf(hf_model, model, tied: bool):
  state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  state, _ = t5_weights.normalise_hf_names(state, tied, "hf")
  found, missing, unused = t5_weights.from_hf_state_dict(state, abstract_params(model))
  assert not missing and not unused, (missing, unused)
  return unflatten(found)


def batch(vocab: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids, dec = rng.integers(0, vocab, (2, 30)), rng.integers(0, vocab, (2, 25))
  mask, dec_mask = np.ones((2, 30), np.int64), np.ones((2, 25), np.int64)
  mask[1, 20:] = 0
  dec_mask[1, 18:] = 0
  return ids, dec, mask, dec_mask


@functools.cache
def built(ff: str, tied: bool):
  """(HF model, ModelConfig, flax model, params from the HF weights) of a variant."""
  hf_model = hf_t5(ff, tied, seed=len(ff) + tied)
  cfg = plmjax_config(hf_model.config)
  model = build_model(cfg, "seq2seq")
  return hf_model, cfg, model, params_from_hf(hf_model, model, tied)


def _name(v):
  return f"{v[0]}-{'tied' if v[1] else 'untied'}"


@pytest.fixture(params=VARIANTS, ids=_name)
def variant(request):
  return built(*request.param)


# The cache does not depend on the feed-forward: two variants cover tied and untied.
@pytest.fixture(params=[VARIANTS[0], VARIANTS[3]], ids=_name)
def cache_variant(request):
  return built(*request.param)


def test_logits_match_hugging_face(variant):
  hf_model, cfg, model, params = variant
  assert cfg.tie_word_embeddings == hf_model.config.scale_decoder_outputs
  ids, dec, mask, dec_mask = batch(cfg.vocab_size)
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   decoder_input_ids=torch.tensor(dec),
                   decoder_attention_mask=torch.tensor(dec_mask))
  out = jax.jit(lambda p: model.apply({"params": p}, ids, dec, attention_mask=mask,
                                      decoder_attention_mask=dec_mask))(params)
  assert out["logits"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out["encoder_hidden"]),
                             ref.encoder_last_hidden_state.numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(out["logits"]), ref.logits.numpy(), atol=1e-5, rtol=0)


def test_kv_cache_decoding_equals_full_decoder(cache_variant):
  """Prefill 3 tokens, then one at a time: the same logits as the full decoder."""
  _, cfg, model, params = cache_variant
  ids, dec, mask, _ = batch(cfg.vocab_size, seed=1)
  variables = {"params": params}
  enc = model.apply(variables, ids, mask, method="encode")
  full = model.apply(variables, dec[:, :8], enc, mask, method="decode")["logits"]
  cache = t5.init_cache(model, 2, 8, enc.shape[1])
  steps = [(0, 3, enc)] + [(i, i + 1, None) for i in range(3, 8)]
  got = []
  for start, end, enc_or_none in steps:
    out, mutated = model.apply({**variables, "cache": cache}, dec[:, start:end], enc_or_none,
                               mask, decode=True, method="decode", mutable=["cache"])
    cache = mutated["cache"]
    got.append(out["logits"])
  np.testing.assert_allclose(np.concatenate(got, axis=1), np.asarray(full), atol=1e-5, rtol=0)


def test_relative_position_buckets_match_hugging_face():
  relative = np.arange(-700, 700)
  for bidirectional in (True, False):
    for buckets, distance in ((32, 128), (8, 20), (32, 64)):
      want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
          torch.tensor(relative), bidirectional, buckets, distance).numpy()
      got = t5_layers.relative_position_bucket(jnp.asarray(relative), bidirectional, buckets, distance)
      np.testing.assert_array_equal(np.asarray(got), want)


def test_decoder_is_causal_and_encoder_sees_all():
  """d logits[t] / d decoder input[s > t] is zero; the encoder's first state depends on
  the last input token."""
  cfg = plmjax_config(hf_t5("relu", True).config)
  model = build_model(cfg, "seq2seq")
  params = model.init(jax.random.key(0), np.ones((1, 6), np.int32))["params"]
  ids = jnp.arange(6)[None] + 3

  def decoder_out(emb):
    return model.apply({"params": params}, emb, ids, method=_decode_from_embeddings)

  emb = model.apply({"params": params}, ids, method=lambda m, x: m.shared(x))
  jac = jax.jit(jax.jacrev(lambda e: decoder_out(e).sum(-1)))(emb)  # [1, T, 1, T, D]
  influence = np.abs(np.asarray(jac)).sum(axis=(0, 2, 4))  # [T out, T in]
  assert np.all(influence[np.triu_indices(6, 1)] == 0)
  assert np.all(influence[np.tril_indices(6)] > 0)
  enc_jac = jax.jit(jax.jacrev(
      lambda e: model.apply({"params": params}, e, method=_encode_embeddings)[0, 0].sum()))(emb)
  assert np.abs(np.asarray(enc_jac))[0, -1].sum() > 0


def _decode_from_embeddings(m, emb_BxTxD, ids):
  enc = m.encode(ids)
  t = emb_BxTxD.shape[1]
  pos = jnp.arange(t)[None]
  return m.decoder(emb_BxTxD, jax_causal(t), (pos, pos), enc, None, True, False)


def _encode_embeddings(m, emb_BxSxD):
  pos = jnp.arange(emb_BxSxD.shape[1])[None]
  return m.encoder(emb_BxSxD, None, (pos, pos), None, None, True, False)


def jax_causal(t):
  from plmjax.models import attention
  return attention.causal_mask(t, t)


def test_every_parameter_has_logical_axes_and_hf_name():
  cfg = plmjax_config(hf_t5("gated-gelu", False).config)
  model = build_model(cfg, "seq2seq")
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), np.ones((1, 2), np.int32)))
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
  names = {t5_weights.hf_name(p) for p in t5_weights.flatten(abstract_params(model))}
  hf_names = set(hf_t5("gated-gelu", False).state_dict()) - set(t5_weights.EMBED_COPIES)
  assert names == hf_names


def test_packed_rows_equal_separate_rows():
  """Two examples packed in one row (segment ids, per-segment positions) give the logits
  each gives alone."""
  cfg = plmjax_config(hf_t5("relu", False).config)
  model = build_model(cfg, "seq2seq")
  params = model.init(jax.random.key(1), np.ones((1, 4), np.int32))["params"]
  rng = np.random.default_rng(0)
  a_in, b_in = rng.integers(3, 80, 7), rng.integers(3, 80, 5)
  a_dec, b_dec = rng.integers(3, 80, 4), rng.integers(3, 80, 6)
  packed = model.apply(
      {"params": params}, np.concatenate([a_in, b_in])[None], np.concatenate([a_dec, b_dec])[None],
      encoder_segment_ids=np.array([[1] * 7 + [2] * 5]),
      decoder_segment_ids=np.array([[1] * 4 + [2] * 6]),
      encoder_positions=np.array([list(range(7)) + list(range(5))]),
      decoder_positions=np.array([list(range(4)) + list(range(6))]))["logits"]
  alone_a = model.apply({"params": params}, a_in[None], a_dec[None])["logits"]
  alone_b = model.apply({"params": params}, b_in[None], b_dec[None])["logits"]
  np.testing.assert_allclose(packed[0, :4], alone_a[0], atol=1e-5)
  np.testing.assert_allclose(packed[0, 4:], alone_b[0], atol=1e-5)


def test_bfloat16_remat_and_dropout():
  hf_cfg = hf_t5("gated-gelu", False).config
  cfg = plmjax_config(hf_cfg)
  ids, dec, mask, _ = batch(cfg.vocab_size)
  model = build_model(cfg, "seq2seq")
  params = jax.jit(lambda key: model.init(key, ids)["params"])(jax.random.key(0))

  def loss_fn(m):
    def loss(p):
      logits = m.apply({"params": p}, ids, dec, attention_mask=mask)["logits"]
      return logits[..., 5].mean(), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  (_, ref_logits), ref_grads = loss_fn(model)(params)
  remat = build_model(plmjax_config(hf_cfg, remat="full"), "seq2seq")
  (_, logits), grads = loss_fn(remat)(params)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, atol=1e-5)
  bf16 = build_model(plmjax_config(hf_cfg, dtype="bfloat16"), "seq2seq")
  out = jax.jit(lambda p: bf16.apply({"params": p}, ids, dec, attention_mask=mask))(params)
  assert out["logits"].dtype == jnp.float32 and out["hidden"].dtype == jnp.bfloat16
  np.testing.assert_allclose(out["logits"], ref_logits, atol=0.05 * np.abs(ref_logits).max())
  # Dropout (one block per stack: XLA:CPU compiles random bits slowly).
  drop = build_model(plmjax_config(hf_cfg, num_layers=1, num_decoder_layers=1,
                                   dropout_rate=0.1, attention_dropout_rate=0.1), "seq2seq")
  small = jax.jit(lambda key: drop.init(key, ids)["params"])(jax.random.key(0))
  fwd = jax.jit(lambda p, key, det: drop.apply({"params": p}, ids, dec, deterministic=det,
                                               rngs={"dropout": key})["logits"],
                static_argnums=2)
  a, b, c = (fwd(small, jax.random.key(k), False) for k in (1, 2, 1))
  assert np.isfinite(a).all() and not np.allclose(a, b) and np.array_equal(a, c)
  no_drop = build_model(plmjax_config(hf_cfg, num_layers=1, num_decoder_layers=1), "seq2seq")
  np.testing.assert_allclose(fwd(small, jax.random.key(1), True),
                             no_drop.apply({"params": small}, ids, dec)["logits"], atol=1e-5)


def test_configs_load_with_t5_1_1_sizes():
  sizes = {}
  for name in ("tiny", "small", "base"):
    config = load_config(f"configs/t5_{name}.py", [])
    cfg = validate(config)
    assert cfg.arch == "t5" and config.task.head == "seq2seq"
    assert cfg.feed_forward_proj == "gated-gelu" and not cfg.tie_word_embeddings
    model = build_model(cfg, config.task.head)
    sizes[name] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(model)))
  # google/t5-v1_1-small and -base as Hugging Face counts them.
  assert sizes["small"] == 76_961_152 and sizes["base"] == 247_577_856


@pytest.mark.parametrize("kw, message", [
    (dict(attention_impl="splash", attention_dropout_rate=0.0), "relative position bias"),
    (dict(feed_forward_proj="gelu"), "feed_forward_proj"),
    (dict(scan_layers=True), "scan_layers"),
])
def test_config_errors(kw, message):
  with pytest.raises(ConfigError, match=message):
    ModelConfig(arch="t5", **kw)


def test_t5_keys_refused_for_other_archs():
  with pytest.raises(ConfigError, match="arch t5 only"):
    ModelConfig(arch="bert", feed_forward_proj="gated-gelu")


def test_shift_right_and_flops():
  labels = jnp.array([[5, 6, -100, 1]])
  np.testing.assert_array_equal(t5.shift_right(labels), [[0, 5, 6, 0]])
  cfg = validate(load_config("configs/t5_base.py", []))
  n_params = 247_577_856 - cfg.vocab_size * cfg.hidden_size  # matmul weights (no shared table)
  flops = t5.training_flops(cfg, 512, 114)
  # 6 x weights x tokens bounds it from below (each token touches its stack's weights).
  assert 6 * n_params * 114 < flops < 6 * n_params * (512 + 114) * 2


def test_sharded_forward_and_grads_equal_one_device():
  """data x fsdp x tensor = 2 x 2 x 2 with the default logical rules: parameters really
  split (embed over fsdp, heads/mlp over tensor), same logits and gradients."""
  import ml_collections
  from jax.sharding import NamedSharding, PartitionSpec as P
  from plmjax.config import DEFAULT_AXIS_RULES
  from plmjax.train import sharding
  hf_model = hf_t5("gated-gelu", False)
  cfg = plmjax_config(hf_model.config)
  model = build_model(cfg, "seq2seq")
  params = params_from_hf(hf_model, model, tied=False)
  ids, dec, mask, dec_mask = batch(cfg.vocab_size)
  ids, dec, mask, dec_mask = (np.concatenate([x, x]) for x in (ids, dec, mask, dec_mask))

  def loss(p, ids, dec, mask, dec_mask):
    logits = model.apply({"params": p}, ids, dec, attention_mask=mask,
                         decoder_attention_mask=dec_mask)["logits"]
    return (jax.nn.log_softmax(logits)[..., 3] * dec_mask).sum(), logits

  (ref_loss, ref_logits), ref_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      params, ids, dec, mask, dec_mask)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), np.ones((1, 2), np.int32)))
  shardings = sharding.logical_shardings(boxed["params"], mesh, DEFAULT_AXIS_RULES)
  q = shardings["encoder"]["block_0"]["layer_0"]["SelfAttention"]["q"]["kernel"]
  assert q.spec == P("fsdp", "tensor")
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_AXIS_RULES):
    sharded = jax.device_put(params, shardings)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    args = [jax.device_put(x, rows) for x in (ids, dec, mask, dec_mask)]
    (got_loss, got_logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        sharded, *args)
  np.testing.assert_allclose(got_logits, ref_logits, atol=1e-5, rtol=0)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("override, message", [
    ("--config.data.max_target_len=2", "max_target_len"),
    ("--config.data.noise_density=1.5", "noise_density"),
    ("--config.data.mean_noise_span_length=0.5", "mean_noise_span_length"),
    ("--config.model.feed_forward_proj=swiglu", "feed_forward_proj"),
])
def test_t5_config_keys_are_validated(override, message):
  with pytest.raises(ConfigError, match=message):
    validate(load_config("configs/t5_tiny.py", [override]))


def _eqns(jaxpr):
  """Equations of a jaxpr and of the jaxprs nested in it (pjit, remat, custom_jvp)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        yield from _eqns(inner)


@pytest.mark.parametrize("v", [VARIANTS[0], VARIANTS[3]], ids=_name)
def test_training_flops_are_three_times_the_forward_matmuls(v):
  """training_flops (MFU's numerator) against the matmuls the forward really runs:
  2 x output elements x contraction size, summed over every dot_general, times 3."""
  _, cfg, model, params = built(*v)
  ids, dec = np.ones((1, 30), np.int32), np.ones((1, 25), np.int32)
  jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, ids, dec))(params).jaxpr
  dots = [e for e in _eqns(jaxpr) if e.primitive.name == "dot_general"]
  forward = sum(2 * math.prod(e.outvars[0].aval.shape)
                * math.prod(e.invars[0].aval.shape[i] for i in e.params["dimension_numbers"][0][0])
                for e in dots)
  assert len(dots) > 10 and 3 * forward == t5.training_flops(cfg, 30, 25)


def test_auto_attention_is_xla_for_t5_on_every_platform():
  from plmjax.models import attention
  cfg = ModelConfig(arch="t5", dtype="bfloat16", attention_dropout_rate=0.0)
  assert cfg.attention_impl == "auto"
  for platform in ("tpu", "gpu", "cpu"):
    for packed in (False, True):
      impl, reason = attention.resolve_impl(cfg, platform, packed)
      assert impl == "xla" and "relative position bias" in reason, (platform, packed)
