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

import flax.linen as nn
import jax
import jax.numpy as jnp

from plmjax.models import attention
from plmjax.models.config import ModelConfig
from plmjax.models.dropout import Dropout
from plmjax.models.t5_layers import T5Block, T5LayerNorm, decoder_layers, dense, head_dim
from plmjax.models.transformer import ACT_EMBED, maybe_remat, tied_logits

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
