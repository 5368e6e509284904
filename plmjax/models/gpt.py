"""GPT-2 (pre-LN causal decoder) with a tied LM head, named as GPT2LMHeadModel.

Decoding with a KV cache (flax's 'cache' collection):

  cache = init_cache(model, batch_size, max_len)
  out, mut = model.apply({"params": params, "cache": cache}, prompt_BxT, decode=True,
                         mutable=["cache"])          # prefill: T tokens at once
  out, mut = model.apply({"params": params, "cache": mut["cache"]}, next_Bx1,
                         decode=True, mutable=["cache"])  # then one token at a time

Positions come from the cache index. Left-padded prompts pass their
attention_mask (and position_ids) in the prefill call; the cache remembers which
slots are padding. Writing past max_len is not detected inside jit: callers keep
prompt + new tokens <= max_len.
"""

import jax
import jax.numpy as jnp
import flax.linen as nn

from plmjax.models import attention
from plmjax.models.config import ModelConfig
from plmjax.models.dropout import Dropout
from plmjax.models.transformer import (ACT_EMBED, GPT2Block, embed, layer_norm, layer_stack,
                                       tied_logits)


class GPT2Model(nn.Module):
  """Embeddings, blocks h_0..h_{N-1} and ln_f; returns the final hidden states BxLxD."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, input_ids_BxL, attention_mask, segment_ids, position_ids,
               deterministic: bool, decode: bool):
    cfg = self.cfg
    batch, length = input_ids_BxL.shape
    mask, start = None, 0
    if decode:
      if segment_ids is not None:
        raise ValueError("segment_ids (packed rows) are for training; decode takes attention_mask")
      mask, start = self._decode_mask(attention_mask, batch, length)
    if mask is None:  # training, eval, or the init call that sizes the cache
      # Decoding attends over the cache under a dense mask: xla.
      mask = attention.make_mask(cfg, attention_mask, segment_ids, "xla" if decode else None)
    if position_ids is None:
      position_ids = start + jnp.arange(length)[None, :]
    position_ids = jnp.broadcast_to(position_ids, (batch, length))

    x = embed(cfg, cfg.vocab_size, ("vocab", "embed"), "wte")(input_ids_BxL)
    x += embed(cfg, cfg.max_position_embeddings, ("position", "embed"), "wpe")(position_ids)
    x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ACT_EMBED)
    # Recomputation buys nothing when decoding (no backward pass).
    x = layer_stack(cfg, GPT2Block, "h", x, mask, deterministic, decode,
                    remat_argnums=None if decode else (3, 4))
    return layer_norm(cfg, "ln_f")(x)

  def _decode_mask(self, attention_mask, batch: int, length: int):
    """Mask over the whole cache for `length` new tokens; advances the cache index.

    Returns (mask Bx1xLxS or None at init, start position of the new tokens).
    """
    initialised = self.has_variable("cache", "cache_index")
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    # At init the input's length is the cache size (max_len).
    key_mask = self.variable("cache", "cached_mask", jnp.zeros, (batch, length), jnp.bool_)
    if not initialised:
      return None, 0
    start = index.value
    valid_BxL = (jnp.ones((batch, length), jnp.bool_) if attention_mask is None
                 else attention_mask.astype(jnp.bool_))
    key_mask.value = jax.lax.dynamic_update_slice(key_mask.value, valid_BxL, (0, start))
    index.value = start + length
    cache_len = key_mask.value.shape[1]
    mask = key_mask.value[:, None, None, :] & attention.causal_mask(length, cache_len, start)
    return mask, start


class GPT(nn.Module):
  """GPT2LMHeadModel: {'logits': BxLxV float32 (tied to wte), 'hidden': BxLxD}.

  Always causal; segment_ids (0 = padding) keep packed documents apart and
  position_ids (default arange(L), or the cache position when decoding) restart
  per document.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids_BxL, *, attention_mask=None, segment_ids=None,
               position_ids=None, deterministic: bool = True, decode: bool = False):
    input_ids_BxL = jnp.asarray(input_ids_BxL, jnp.int32)
    transformer = GPT2Model(self.config, name="transformer")
    hidden_BxLxD = transformer(input_ids_BxL, attention_mask, segment_ids, position_ids,
                               deterministic, decode)
    wte_VxD = nn.meta.unbox(transformer.variables["params"]["wte"]["embedding"])
    return {"logits": tied_logits(hidden_BxLxD, wte_VxD, self.config), "hidden": hidden_BxLxD}


def init_cache(model: GPT, batch_size: int, max_len: int):
  """An empty KV cache for `batch_size` rows of up to `max_len` tokens (no params built)."""
  def init():
    ids = jnp.ones((batch_size, max_len), jnp.int32)
    return model.init(jax.random.key(0), ids, decode=True)["cache"]
  shapes = jax.eval_shape(init)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
