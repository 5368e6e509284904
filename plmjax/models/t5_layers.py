"""T5's layers (plmjax.models.t5 puts them together; its docstring says how T5 differs
from BERT/GPT-2 and names the parameter tree): RMS layer norm, bias-free dense layers,
the bucketed relative position bias, self- and cross-attention with a decode cache,
the relu / gated-gelu feed-forward, and one block.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from plmjax.models import dropout
from plmjax.models.config import ModelConfig
from plmjax.models.dropout import Dropout
from plmjax.models.transformer import ACT_EMBED, ACT_MLP

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # as plmjax.models.attention


def head_dim(cfg: ModelConfig) -> int:
  return cfg.attention_head_dim or cfg.hidden_size // cfg.num_heads


def decoder_layers(cfg: ModelConfig) -> int:
  return cfg.num_decoder_layers or cfg.num_layers


def dense(cfg: ModelConfig, features: int, axes: tuple[str, str], name: str,
          stddev: float) -> nn.Dense:
  """A bias-free nn.Dense with the precision policy; kernel [in, out] named `axes`.
  (transformer.dense always has a bias.)"""
  return nn.Dense(
      features, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.weights_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(stddev), axes), name=name)


class T5LayerNorm(nn.Module):
  """RMS norm: x / sqrt(mean(x^2) + eps) * scale, statistics in float32; the normalised
  x is cast to the compute dtype before the scale multiplies it (HF casts to a half
  weight's dtype the same way)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    init = nn.initializers.constant(cfg.initializer_range)  # HF: factor * 1.0
    scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)),
                       (x_BxLxD.shape[-1],), cfg.weights_dtype)
    x32 = x_BxLxD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) +
                              cfg.layer_norm_eps)
    return x32.astype(cfg.compute_dtype) * scale.astype(cfg.compute_dtype)


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int,
                             max_distance: int):
  """T5's buckets of key - query: exact below num_buckets // 2 (per direction), then
  logarithmic up to max_distance, then the last bucket (HF's _relative_position_bucket)."""
  buckets = 0
  if bidirectional:
    num_buckets //= 2
    buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
    relative_position = jnp.abs(relative_position)
  else:
    relative_position = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = relative_position < max_exact
  # float32 throughout, as HF and mesh-tf: the bucket edges are those of float32 logs.
  large = max_exact + (jnp.log(relative_position.astype(jnp.float32) / max_exact)
                       / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, relative_position, large)


def attend(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, bias, mask, cfg: ModelConfig, deterministic: bool,
           dropout_rng) -> jax.Array:
  """softmax(q k^T + bias, masked) v, unscaled (T5), logits and softmax in float32."""
  logits_BxHxLxS = jnp.einsum("blhk,bshk->bhls", q_BxLxHxK, k_BxSxHxK,
                              preferred_element_type=jnp.float32)
  if bias is not None:
    logits_BxHxLxS = logits_BxHxLxS + bias
  if mask is not None:
    logits_BxHxLxS = jnp.where(mask, logits_BxHxLxS, _MASKED)
  probs_BxHxLxS = jax.nn.softmax(logits_BxHxLxS, axis=-1)
  if not deterministic and cfg.attention_dropout_rate > 0:
    probs_BxHxLxS = dropout.apply(probs_BxHxLxS, dropout_rng, cfg.attention_dropout_rate)
  return jnp.einsum("bhls,bshk->blhk", probs_BxHxLxS.astype(v_BxSxHxK.dtype), v_BxSxHxK)


class T5Attention(nn.Module):
  """q, k, v, o projections (no biases); self-attention, or cross-attention over `kv`.

  The first self-attention of a stack owns `relative_attention_bias` and computes the
  stack's position bias from `positions` (query, key positions), returned for the
  other blocks. decode=True: self-attention appends to its KV cache; cross-attention
  stores k/v of `kv` when given and reuses them when `kv` is None.
  """
  cfg: ModelConfig
  has_relative_attention_bias: bool = False
  bidirectional: bool = True
  cross: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, kv_BxSxD, mask, positions, bias, deterministic: bool,
               decode: bool = False):
    cfg = self.cfg
    heads, kdim, d, f = cfg.num_heads, head_dim(cfg), cfg.hidden_size, cfg.initializer_range
    inner = heads * kdim

    def split(x):
      return x.reshape(*x.shape[:-1], heads, kdim)

    q = split(dense(cfg, inner, ("embed", "heads"), "q", f * (d * kdim) ** -0.5)(x_BxLxD))
    k_proj = dense(cfg, inner, ("embed", "heads"), "k", f * d ** -0.5)
    v_proj = dense(cfg, inner, ("embed", "heads"), "v", f * d ** -0.5)
    if self.cross:
      k, v = self._cross_kv(kv_BxSxD, k_proj, v_proj, split, decode)
    else:
      k, v = split(k_proj(x_BxLxD)), split(v_proj(x_BxLxD))
      if decode:
        k, v = self._update_cache(k, v)
    if self.has_relative_attention_bias:
      bias = self._position_bias(*positions)
    rng = None if deterministic or cfg.attention_dropout_rate == 0 else self.make_rng("dropout")
    out_BxLxHxK = attend(q, k, v, bias, mask, cfg, deterministic, rng)
    out = dense(cfg, d, ("heads", "embed"), "o", f * inner ** -0.5)(
        out_BxLxHxK.reshape(*out_BxLxHxK.shape[:-2], inner))
    return out, bias

  def _position_bias(self, q_pos_BxL, k_pos_BxS):
    """Bias BxHxLxS (B may be 1) in float32 from query and key positions."""
    cfg = self.cfg
    table = nn.Embed(
        cfg.relative_attention_num_buckets, cfg.num_heads, dtype=jnp.float32,
        param_dtype=cfg.weights_dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(cfg.initializer_range * cfg.hidden_size ** -0.5),
            ("position", "heads")),
        name="relative_attention_bias")
    relative_BxLxS = k_pos_BxS[:, None, :] - q_pos_BxL[:, :, None]
    buckets = relative_position_bucket(relative_BxLxS, self.bidirectional,
                                       cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance)
    return jnp.transpose(table(buckets), (0, 3, 1, 2))

  def _update_cache(self, k_BxLxHxK, v_BxLxHxK):
    """As GPT2Attention's: after the init call, writes k, v at the cache index and returns
    the whole cache (causality comes from the stack's decode mask)."""
    initialised = self.has_variable("cache", "cached_key")
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k_BxLxHxK.shape, k_BxLxHxK.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v_BxLxHxK.shape, v_BxLxHxK.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialised:
      return k_BxLxHxK, v_BxLxHxK
    start = (0, index.value, 0, 0)
    for cached, new in ((cached_k, k_BxLxHxK), (cached_v, v_BxLxHxK)):
      cached.value = jax.lax.dynamic_update_slice(cached.value, new.astype(cached.value.dtype),
                                                  start)
    index.value = index.value + k_BxLxHxK.shape[1]
    return cached_k.value, cached_v.value

  def _cross_kv(self, kv_BxSxD, k_proj, v_proj, split, decode: bool):
    if not decode:
      return split(k_proj(kv_BxSxD)), split(v_proj(kv_BxSxD))
    if kv_BxSxD is None:  # later decoding steps: the encoder's k/v from the cache
      if not self.has_variable("cache", "cross_key"):
        raise ValueError("decoding without encoder states needs the cross-attention cache: "
                         "pass the encoder output in the first decode call")
      return (self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value"))
    k, v = split(k_proj(kv_BxSxD)), split(v_proj(kv_BxSxD))
    self.put_variable("cache", "cross_key", k)
    self.put_variable("cache", "cross_value", v)
    return k, v


class T5LayerAttention(nn.Module):
  """x + dropout(attention(RMSNorm(x))): T5LayerSelfAttention / T5LayerCrossAttention."""
  cfg: ModelConfig
  has_relative_attention_bias: bool = False
  bidirectional: bool = True
  cross: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, kv_BxSxD, mask, positions, bias, deterministic: bool,
               decode: bool):
    h = T5LayerNorm(self.cfg, name="layer_norm")(x_BxLxD)
    name = "EncDecAttention" if self.cross else "SelfAttention"
    h, bias = T5Attention(self.cfg, self.has_relative_attention_bias, self.bidirectional,
                          self.cross, name=name)(h, kv_BxSxD, mask, positions, bias,
                                                 deterministic, decode)
    return x_BxLxD + Dropout(self.cfg.dropout_rate)(h, deterministic=deterministic), bias


class T5LayerFF(nn.Module):
  """x + dropout(wo(act(wi(RMSNorm(x))))); gated-gelu: wo(gelu_new(wi_0 x) * wi_1 x)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, deterministic: bool):
    cfg = self.cfg
    h = T5LayerNorm(cfg, name="layer_norm")(x_BxLxD)
    h = _DenseReluDense(cfg, name="DenseReluDense")(h, deterministic)
    return x_BxLxD + Dropout(cfg.dropout_rate)(h, deterministic=deterministic)


class _DenseReluDense(nn.Module):
  """HF's T5DenseActDense (wi, wo) or T5DenseGatedActDense (wi_0, wi_1, wo)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, deterministic: bool):
    cfg = self.cfg
    f, d, ff = cfg.initializer_range, cfg.hidden_size, cfg.intermediate_size
    if cfg.feed_forward_proj == "gated-gelu":
      gate = dense(cfg, ff, ("embed", "mlp"), "wi_0", f * d ** -0.5)(x_BxLxD)
      linear = dense(cfg, ff, ("embed", "mlp"), "wi_1", f * d ** -0.5)(x_BxLxD)
      h = nn.gelu(nn.with_logical_constraint(gate, ACT_MLP), approximate=True) * linear
    else:
      h = nn.relu(dense(cfg, ff, ("embed", "mlp"), "wi", f * d ** -0.5)(x_BxLxD))
    h_BxLxF = Dropout(cfg.dropout_rate)(nn.with_logical_constraint(h, ACT_MLP),
                                        deterministic=deterministic)
    return dense(cfg, d, ("mlp", "embed"), "wo", f * ff ** -0.5)(h_BxLxF)


class T5Block(nn.Module):
  """Self-attention, (decoder:) cross-attention, feed-forward; returns (x, position bias)."""
  cfg: ModelConfig
  is_decoder: bool
  has_relative_attention_bias: bool

  @nn.compact
  def __call__(self, x_BxLxD, mask, positions, bias, encoder_BxSxD, cross_mask,
               deterministic: bool, decode: bool):
    cfg = self.cfg
    x, bias = T5LayerAttention(cfg, self.has_relative_attention_bias, not self.is_decoder,
                               name="layer_0")(x_BxLxD, None, mask, positions, bias,
                                               deterministic, decode)
    if self.is_decoder:
      x, _ = T5LayerAttention(cfg, cross=True, name="layer_1")(
          x, encoder_BxSxD, cross_mask, None, None, deterministic, decode)
    x = T5LayerFF(cfg, name=f"layer_{2 if self.is_decoder else 1}")(x, deterministic)
    return nn.with_logical_constraint(x, ACT_EMBED), bias
