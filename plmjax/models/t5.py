"""T5 (encoder-decoder) named as Hugging Face's T5ForConditionalGeneration.

T5 differs from BERT/GPT-2 in ways that need layers of its own here: RMS layer norm
(no mean, no bias), dense layers without biases, no 1/sqrt(d) attention scaling (T5
folds it into the init), and a relative position bias in place of position
embeddings: a learned scalar per head and bucket of the distance key - query
(bidirectional buckets in the encoder, causal ones in the decoder), held and computed
by the first block of each stack (HF's `has_relative_attention_bias`) and passed on to
the others. Cross-attention has no position bias. The kernel is always xla's einsum:
splash and cuDNN take no additive bias (config.model.attention_impl must be auto/xla).

Precision as plmjax/models/transformer.py: float32 parameters, compute in
cfg.compute_dtype, RMS statistics, attention logits/softmax and output logits in
float32.

Parameter tree (`block_3/layer_0` <-> HF's `block.3.layer.0`):
  shared/embedding                     [V, D]   HF shared.weight (= embed_tokens of both stacks)
  encoder/block_i/layer_0/SelfAttention/{q,k,v,o}/kernel, layer_0/layer_norm/scale
  encoder/block_0/layer_0/SelfAttention/relative_attention_bias/embedding  [buckets, H]
  encoder/block_i/layer_1/DenseReluDense/{wi | wi_0, wi_1}, wo, layer_1/layer_norm
  decoder/block_i/layer_0 (causal self-attention), layer_1/EncDecAttention, layer_2 (FF)
  {encoder,decoder}/final_layer_norm/scale
  lm_head/kernel                       [D, V]   only when untied (T5 1.1)

Decoding with a cache (flax's 'cache' collection), for generation:

  enc = model.apply(v, ids_BxS, mask_BxS, method="encode")
  cache = init_cache(model, batch, max_len, enc.shape[1])
  out, mut = model.apply({**v, "cache": cache}, start_Bx1, enc, mask_BxS, decode=True,
                         method="decode", mutable=["cache"])   # stores cross-attention k/v
  out, mut = model.apply({**v, "cache": mut["cache"]}, next_Bx1, None, mask_BxS,
                         decode=True, method="decode", mutable=["cache"])  # reuses them
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from plmjax.models import attention, dropout
from plmjax.models.config import ModelConfig
from plmjax.models.dropout import Dropout
from plmjax.models.transformer import ACT_EMBED, ACT_MLP, maybe_remat, tied_logits

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


class T5Stack(nn.Module):
  """Dropout, blocks block_0.., final_layer_norm, dropout (HF's T5Stack, minus the
  embedding, which the model shares between the stacks)."""
  cfg: ModelConfig
  is_decoder: bool

  @nn.compact
  def __call__(self, x_BxLxD, mask, positions, encoder_BxSxD, cross_mask,
               deterministic: bool, decode: bool):
    cfg = self.cfg
    if decode:
      mask, positions = self._decode_mask(x_BxLxD.shape[1])
    x = Dropout(cfg.dropout_rate)(x_BxLxD, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ACT_EMBED)
    # self=0, x, mask, positions, bias, encoder, cross_mask, deterministic=7, decode=8
    block_cls = T5Block if decode else maybe_remat(T5Block, cfg, static_argnums=(7, 8))
    bias = None
    for i in range(decoder_layers(cfg) if self.is_decoder else cfg.num_layers):
      x, bias = block_cls(cfg, self.is_decoder, i == 0, name=f"block_{i}")(
          x, mask, positions, bias, encoder_BxSxD, cross_mask, deterministic, decode)
    x = T5LayerNorm(cfg, name="final_layer_norm")(x)
    return Dropout(cfg.dropout_rate)(x, deterministic=deterministic)

  def _decode_mask(self, length: int):
    """(mask 1x1xLxC, (query positions, key positions)) for `length` new tokens over the
    cache of C slots; advances the cache index. At init the length sets C."""
    initialised = self.has_variable("cache", "cache_index")
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    slots = self.variable("cache", "cache_slots", lambda: jnp.zeros((length,), jnp.bool_))
    if not initialised:
      pos = jnp.arange(length)[None, :]
      return attention.causal_mask(length, length), (pos, pos)
    start, cache_len = index.value, slots.value.shape[0]
    index.value = start + length
    return (attention.causal_mask(length, cache_len, start),
            (start + jnp.arange(length)[None, :], jnp.arange(cache_len)[None, :]))


def _positions(positions_BxL, length: int):
  return jnp.arange(length)[None, :] if positions_BxL is None else jnp.asarray(positions_BxL)


def cross_mask(encoder_mask_BxS=None, encoder_segment_ids=None, decoder_segment_ids=None,
               query_len: int = 1):
  """Decoder -> encoder mask Bx1xLxS: same segment (packed rows), else the encoder's
  padding; None when neither is given."""
  if encoder_segment_ids is not None and decoder_segment_ids is not None:
    same_BxLxS = decoder_segment_ids[:, :, None] == encoder_segment_ids[:, None, :]
    return (same_BxLxS & (encoder_segment_ids != 0)[:, None, :])[:, None]
  if encoder_mask_BxS is not None:
    return attention.padding_mask(encoder_mask_BxS, query_len)
  return None


class T5ForConditionalGeneration(nn.Module):
  """{'logits': BxTxV float32, 'hidden': BxTxD decoder states, 'encoder_hidden': BxSxD}.

  decoder_input_ids are the targets shifted right (`shift_right`); None (model.init
  only) reuses input_ids. Packed rows pass segment ids (0 = padding) and per-segment
  positions (the relative position bias then measures distance within a segment).
  """
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.shared = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=cfg.weights_dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")))
    self.encoder = T5Stack(cfg, is_decoder=False)
    self.decoder = T5Stack(cfg, is_decoder=True)
    if not cfg.tie_word_embeddings:
      self.lm_head = dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head",
                           cfg.initializer_range)

  def __call__(self, input_ids_BxS, decoder_input_ids_BxT=None, *, attention_mask=None,
               decoder_attention_mask=None, encoder_segment_ids=None, decoder_segment_ids=None,
               encoder_positions=None, decoder_positions=None, deterministic: bool = True):
    if decoder_input_ids_BxT is None:
      decoder_input_ids_BxT = input_ids_BxS
    encoder_BxSxD = self.encode(input_ids_BxS, attention_mask, segment_ids=encoder_segment_ids,
                                positions=encoder_positions, deterministic=deterministic)
    out = self.decode(decoder_input_ids_BxT, encoder_BxSxD, attention_mask,
                      decoder_attention_mask=decoder_attention_mask,
                      encoder_segment_ids=encoder_segment_ids,
                      decoder_segment_ids=decoder_segment_ids, positions=decoder_positions,
                      deterministic=deterministic)
    return {**out, "encoder_hidden": encoder_BxSxD}

  def encode(self, input_ids_BxS, attention_mask=None, *, segment_ids=None, positions=None,
             deterministic: bool = True):
    """The encoder's final states BxSxD."""
    input_ids_BxS = jnp.asarray(input_ids_BxS, jnp.int32)
    length = input_ids_BxS.shape[1]
    mask = attention.build_mask(attention_mask, segment_ids)
    pos = _positions(positions, length)
    return self.encoder(self.shared(input_ids_BxS), mask, (pos, pos), None, None,
                        deterministic, False)

  def decode(self, decoder_input_ids_BxT, encoder_BxSxD, encoder_attention_mask=None, *,
             decoder_attention_mask=None, encoder_segment_ids=None, decoder_segment_ids=None,
             positions=None, deterministic: bool = True, decode: bool = False):
    """Logits of the next token at each decoder position; decode=True: with the cache
    (encoder_BxSxD only in the first call, None afterwards)."""
    cfg = self.config
    ids_BxT = jnp.asarray(decoder_input_ids_BxT, jnp.int32)
    length = ids_BxT.shape[1]
    mask, pos = None, None  # decode: the stack's, from its cache index
    if not decode:
      mask = attention.combine(attention.build_mask(decoder_attention_mask, decoder_segment_ids),
                               attention.causal_mask(length, length))
      pos = _positions(positions, length)
    enc_mask = cross_mask(encoder_attention_mask, encoder_segment_ids, decoder_segment_ids,
                          length)
    hidden_BxTxD = self.decoder(self.shared(ids_BxT), mask, (pos, pos), encoder_BxSxD,
                                enc_mask, deterministic, decode)
    if cfg.tie_word_embeddings:
      # T5 1.0 rescales before the tied projection (mesh-tf's d_model ** -0.5).
      x = hidden_BxTxD * jnp.asarray(cfg.hidden_size ** -0.5, hidden_BxTxD.dtype)
      logits = tied_logits(x, self.shared.embedding, cfg)
    else:
      logits = self.lm_head(hidden_BxTxD).astype(jnp.float32)
    return {"logits": logits, "hidden": hidden_BxTxD}


def init_cache(model: T5ForConditionalGeneration, batch_size: int, max_len: int,
               encoder_len: int):
  """An empty decoder cache: self-attention k/v for `max_len` target tokens and room for
  the cross-attention k/v of `encoder_len` encoder states (no params built)."""
  def init():
    ids = jnp.ones((batch_size, max_len), jnp.int32)
    enc = jnp.zeros((batch_size, encoder_len, model.config.hidden_size),
                    model.config.compute_dtype)
    return model.init(jax.random.key(0), ids, enc, decode=True, method="decode")["cache"]
  shapes = jax.eval_shape(init)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def shift_right(labels_BxT, decoder_start_token_id: int = 0, pad_token_id: int = 0):
  """Decoder inputs from targets (HF's _shift_right): start token, then the targets
  without the last; -100 (ignored labels) become padding."""
  labels_BxT = jnp.asarray(labels_BxT)
  shifted = jnp.concatenate(
      [jnp.full_like(labels_BxT[:, :1], decoder_start_token_id), labels_BxT[:, :-1]], axis=1)
  return jnp.where(shifted == -100, pad_token_id, shifted)


def training_flops(cfg: ModelConfig, input_len: int, target_len: int) -> float:
  """Training FLOPs of one (input, target) example: 6 x multiply-adds of the weights per
  token they touch, plus attention's 2 x 2 x L x S x H x K per matmul pair times 3.

  Encoder tokens (input_len) pass q,k,v,o and the FF; decoder tokens (target_len) pass
  self- and cross-attention projections and the FF, and the output projection; cross
  k/v run over the encoder states. Embedding lookups and the position bias are free.
  """
  d, inner, ff, v = cfg.hidden_size, cfg.num_heads * head_dim(cfg), cfg.intermediate_size, \
      cfg.vocab_size
  ff_mats = 3 if cfg.feed_forward_proj == "gated-gelu" else 2
  enc_layer = 4 * d * inner + ff_mats * d * ff
  dec_layer = 8 * d * inner + ff_mats * d * ff
  n_enc, n_dec = cfg.num_layers, decoder_layers(cfg)
  weights = (input_len * n_enc * enc_layer
             + target_len * n_dec * (dec_layer - 2 * d * inner)  # cross k, v: encoder side
             + input_len * n_dec * 2 * d * inner
             + target_len * d * v)
  attn = (n_enc * input_len * input_len + n_dec * target_len * (target_len + input_len)) * inner
  return 6.0 * weights + 6.0 * 2 * attn
