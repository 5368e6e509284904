"""Scaled dot-product attention: mask building and the softmax(QK^T)V core.

Masks are boolean, True where a query may attend to a key, shaped Bx1xLqxLk so
they broadcast over heads. Causality is kept apart from the mask (`causal=True`)
so the fused kernels can use their own causal path (cuDNN's `is_causal`).
"""

import jax
import jax.numpy as jnp
import numpy as np

from plmjax.models import dropout
from plmjax.models.config import ModelConfig


def padding_mask(attention_mask_BxL: jax.Array, query_len: int | None = None) -> jax.Array:
  """Key-padding mask from a 1 (real) / 0 (pad) mask: Bx1xLqxLk."""
  valid_BxL = attention_mask_BxL.astype(bool)
  batch, length = valid_BxL.shape
  query_len = length if query_len is None else query_len
  return jnp.broadcast_to(valid_BxL[:, None, None, :], (batch, 1, query_len, length))


def segment_mask(segment_ids_BxL: jax.Array) -> jax.Array:
  """Packed rows: a token attends only to keys of its own nonzero segment id."""
  same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  real_key_Bx1xL = (segment_ids_BxL != 0)[:, None, :]
  return (same_BxLxL & real_key_Bx1xL)[:, None]


def build_mask(attention_mask_BxL: jax.Array | None = None,
               segment_ids_BxL: jax.Array | None = None) -> jax.Array | None:
  """Bx1xLxL mask from segment ids (which supersede) or a padding mask; None if neither."""
  if segment_ids_BxL is not None:
    return segment_mask(segment_ids_BxL)
  if attention_mask_BxL is not None:
    return padding_mask(attention_mask_BxL)
  return None


def causal_mask(query_len: int, key_len: int, offset: jax.Array | int = 0) -> jax.Array:
  """1x1xLqxLk: query t (at absolute position offset + t) sees keys j <= offset + t."""
  q_pos = jnp.arange(query_len)[:, None] + offset
  k_pos = jnp.arange(key_len)[None, :]
  return (k_pos <= q_pos)[None, None]


def combine(*masks: jax.Array | None) -> jax.Array | None:
  """Logical AND of the masks that are not None."""
  out = None
  for mask in masks:
    if mask is not None:
      out = mask if out is None else out & mask
  return out


def dot_product_attention(q_BxLxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array,
                          mask: jax.Array | None, *, causal: bool, cfg: ModelConfig,
                          deterministic: bool = True,
                          dropout_rng: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(K) + mask) v with the softmax in float32; returns BxLxHxK.

  The fused `jax.nn.dot_product_attention` has no dropout, so training with
  attention dropout takes the explicit einsum path (same math). Its xla
  implementation computes logits with preferred_element_type=float32 and the
  softmax in float32 even for bfloat16 inputs.
  """
  use_dropout = not deterministic and cfg.attention_dropout_rate > 0.0
  if not use_dropout:
    impl = cfg.attention_impl if cfg.attention_impl == "cudnn" else "xla"
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask,
                                        is_causal=causal, implementation=impl)
  if dropout_rng is None:
    raise ValueError("attention dropout needs dropout_rng when deterministic=False")
  if causal:
    mask = combine(mask, causal_mask(q_BxLxHxK.shape[1], k_BxSxHxK.shape[1]))
  scale = 1.0 / np.sqrt(q_BxLxHxK.shape[-1])
  logits_BxHxLxS = jnp.einsum("blhk,bshk->bhls", q_BxLxHxK, k_BxSxHxK,
                              preferred_element_type=jnp.float32) * scale
  if mask is not None:
    # Same fill value as jax.nn.dot_product_attention, so fully masked rows
    # (padding queries) become uniform instead of NaN.
    logits_BxHxLxS = jnp.where(mask, logits_BxHxLxS, -0.7 * jnp.finfo(jnp.float32).max)
  probs_BxHxLxS = jax.nn.softmax(logits_BxHxLxS, axis=-1)
  probs_BxHxLxS = dropout.apply(probs_BxHxLxS, dropout_rng, cfg.attention_dropout_rate)
  return jnp.einsum("bhls,bshk->blhk", probs_BxHxLxS.astype(v_BxSxHxK.dtype), v_BxSxHxK)
