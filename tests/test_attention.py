"""Attention core: masks, the fused path, the einsum (dropout) path, float32 softmax, and
the kernel choice (resolve_impl; splash itself: tests/test_splash.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plmjax.errors import ConfigError
from plmjax.models import attention
from plmjax.models.config import ModelConfig

CFG = ModelConfig(hidden_size=32, num_heads=4, num_layers=1, intermediate_size=64,
                  vocab_size=64, max_position_embeddings=16)


def _qkv(dtype=jnp.float32, batch=2, length=6, heads=4, dim=8):
  keys = jax.random.split(jax.random.key(0), 3)
  return [jax.random.normal(k, (batch, length, heads, dim), dtype) for k in keys]


def test_segment_mask_blocks_other_segments_and_padding():
  seg = jnp.array([[1, 1, 2, 2, 0]])
  mask = np.asarray(attention.segment_mask(seg))[0, 0]
  want = np.array([[1, 1, 0, 0, 0],
                   [1, 1, 0, 0, 0],
                   [0, 0, 1, 1, 0],
                   [0, 0, 1, 1, 0],
                   [0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(mask, want)


def test_padding_mask_and_build_mask_precedence():
  am = jnp.array([[1, 1, 0]])
  mask = np.asarray(attention.padding_mask(am))
  assert mask.shape == (1, 1, 3, 3)
  np.testing.assert_array_equal(mask[0, 0], [[1, 1, 0]] * 3)
  # Segment ids supersede the padding mask.
  seg = jnp.array([[1, 2, 2]])
  np.testing.assert_array_equal(attention.build_mask(am, seg), attention.segment_mask(seg))
  assert attention.build_mask(None, None) is None


def test_causal_mask_with_offset():
  mask = np.asarray(attention.causal_mask(2, 5, offset=2))[0, 0]
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])


def test_einsum_path_matches_fused_path():
  # A vanishing dropout rate takes the einsum path but keeps (almost surely) every weight.
  cfg = dataclasses.replace(CFG, attention_dropout_rate=1e-9)
  q, k, v = _qkv()
  mask = attention.segment_mask(jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]]))
  for causal in (False, True):
    fused = attention.dot_product_attention(q, k, v, mask, causal=causal, cfg=cfg)
    explicit = attention.dot_product_attention(q, k, v, mask, causal=causal, cfg=cfg,
                                               deterministic=False,
                                               dropout_rng=jax.random.key(1))
    np.testing.assert_allclose(explicit, fused, atol=1e-5)


def test_attention_dropout_changes_output_and_needs_rng():
  cfg = dataclasses.replace(CFG, attention_dropout_rate=0.5)
  q, k, v = _qkv()
  base = attention.dot_product_attention(q, k, v, None, causal=False, cfg=cfg)
  drop1 = attention.dot_product_attention(q, k, v, None, causal=False, cfg=cfg,
                                          deterministic=False, dropout_rng=jax.random.key(1))
  drop2 = attention.dot_product_attention(q, k, v, None, causal=False, cfg=cfg,
                                          deterministic=False, dropout_rng=jax.random.key(2))
  assert np.all(np.isfinite(drop1))
  assert not np.allclose(drop1, base, atol=1e-3)
  assert not np.allclose(drop1, drop2, atol=1e-3)
  with pytest.raises(ValueError, match="dropout_rng"):
    attention.dot_product_attention(q, k, v, None, causal=False, cfg=cfg, deterministic=False)


def test_fused_xla_path_takes_softmax_in_float32_for_bfloat16():
  q, k, v = _qkv(jnp.bfloat16)
  jaxpr = jax.make_jaxpr(
      lambda q, k, v: attention.dot_product_attention(q, k, v, None, causal=True, cfg=CFG))(q, k, v)
  exps = [eqn for eqn in _all_eqns(jaxpr.jaxpr) if eqn.primitive.name == "exp"]
  assert exps and all(eqn.outvars[0].aval.dtype == jnp.float32 for eqn in exps)
  out = attention.dot_product_attention(q, k, v, None, causal=True, cfg=CFG)
  assert out.dtype == jnp.bfloat16
  ref = attention.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), None,
                                        causal=True, cfg=CFG)
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=5e-2)


def test_fully_masked_rows_stay_finite():
  q, k, v = _qkv()
  mask = attention.segment_mask(jnp.zeros((2, 6), jnp.int32))  # all padding
  out = attention.dot_product_attention(q, k, v, mask, causal=False, cfg=CFG)
  assert np.all(np.isfinite(out))


def _all_eqns(jaxpr):
  """Equations of a jaxpr and of the jaxprs nested in it (pjit, vmap bodies)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)  # ClosedJaxpr -> Jaxpr
      if hasattr(inner, "eqns"):
        yield from _all_eqns(inner)


# ------------------------------------------------------------- choosing a kernel


def _cfg(**kw):
  return dataclasses.replace(CFG, **{"attention_dropout_rate": 0.0, **kw})


@pytest.mark.parametrize("kw, platform, packed, want", [
    (dict(), "tpu", False, "splash"),
    (dict(), "tpu", True, "splash"),
    (dict(dtype="bfloat16"), "gpu", False, "cudnn"),
    (dict(dtype="bfloat16"), "gpu", True, "xla"),  # no segment ids for cuDNN
    (dict(), "gpu", False, "xla"),  # float32: cuDNN takes bfloat16 / float16
    (dict(), "cpu", False, "xla"),
    (dict(attention_dropout_rate=0.1), "tpu", False, "xla"),
    (dict(attention_impl="xla"), "tpu", False, "xla"),
    (dict(attention_impl="splash"), "cpu", False, "splash"),  # Pallas interpret mode
    (dict(attention_impl="cudnn", dtype="bfloat16"), "gpu", True, "xla"),
])
def test_resolve_impl(kw, platform, packed, want):
  impl, reason = attention.resolve_impl(_cfg(**kw), platform, packed)
  assert impl == want and reason and "\n" not in reason
  if "attention_dropout_rate" in kw:
    assert "config.model.attention_dropout_rate=0.1" in reason


def test_fused_kernels_with_attention_dropout_and_cudnn_off_gpu_are_config_errors():
  for impl in ("splash", "cudnn"):
    with pytest.raises(ConfigError, match="config.model.attention_dropout_rate=0.1"):
      dataclasses.replace(CFG, attention_impl=impl, attention_dropout_rate=0.1)
  with pytest.raises(ConfigError, match="needs a GPU"):
    attention.resolve_impl(_cfg(attention_impl="cudnn"), "cpu", False)
  with pytest.raises(ConfigError, match="config.model.dtype=float32"):
    attention.resolve_impl(_cfg(attention_impl="cudnn"), "gpu", False)
  assert CFG.attention_impl == "auto"


def test_make_mask_outside_a_mesh_resolves_for_the_default_device():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  assert attention.device_platform(mesh) == attention.device_platform() == "cpu"
  # Outside a mesh: the default (CPU) device, so auto is xla here.
  mask = attention.make_mask(_cfg(), jnp.ones((1, 4), jnp.int32))
  assert mask.impl == "xla" and mask.dense.shape == (1, 1, 4, 4)
  assert attention.make_mask(_cfg(attention_impl="splash")).impl == "splash"
  assert attention.make_mask(_cfg(), impl="cudnn").impl == "cudnn"


@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_lengths_match_the_mask_path(causal):
  # The very arguments the cuDNN path passes, run through XLA: right-aligned padding as
  # lengths must equal the padding mask at every real position.
  q, k, v = _qkv(length=8)
  am = jnp.array([[1] * 8, [1] * 5 + [0] * 3])
  cfg = _cfg(attention_impl="cudnn", dtype="bfloat16")
  mask = attention.make_mask(cfg, am, impl="cudnn")
  np.testing.assert_array_equal(mask.lengths_B, [8, 5])
  got = attention.cudnn_attention(q, k, v, mask.lengths_B, causal=causal, implementation="xla")
  want = attention.dot_product_attention(q, k, v, attention.padding_mask(am), causal=causal,
                                         cfg=CFG)
  real = np.asarray(am, bool)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-6)
