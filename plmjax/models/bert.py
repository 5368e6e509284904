"""BERT (post-LN encoder) and its task heads, named as Hugging Face's BERT.

All models return dicts; logits are float32. Packed rows pass `segment_ids`
(0 = padding; tokens attend only within their segment), per-segment
`position_ids` and, for one NSP prediction per packed pair, `cls_positions`.
"""

import jax
import jax.numpy as jnp
import flax.linen as nn

from plmjax.models import attention
from plmjax.models.config import ModelConfig
from plmjax.models.dropout import Dropout
from plmjax.models.transformer import (ACT_EMBED, BertLayer, dense, embed, layer_norm,
                                       layer_stack, tied_logits)


def gather_positions(x_BxLxD: jax.Array, positions_BxP: jax.Array) -> jax.Array:
  """x[b, positions[b, p]] -> BxPxD."""
  return jnp.take_along_axis(x_BxLxD, positions_BxP[..., None].astype(jnp.int32), axis=1)


class BertEmbeddings(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, input_ids_BxL, token_type_ids_BxL, position_ids_BxL, deterministic: bool):
    cfg = self.cfg
    x = embed(cfg, cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids_BxL)
    x += embed(cfg, cfg.max_position_embeddings, ("position", "embed"),
               "position_embeddings")(position_ids_BxL)
    x += embed(cfg, cfg.type_vocab_size, ("type", "embed"),
               "token_type_embeddings")(token_type_ids_BxL)
    x = layer_norm(cfg, "LayerNorm")(x)
    return Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class BertEncoder(nn.Module):
  """layer_0 .. layer_{N-1}, or with model.scan_layers one scanned `layer` (stacked params)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask, deterministic: bool):
    return layer_stack(self.cfg, BertLayer, "layer", x_BxLxD, mask, deterministic,
                       remat_argnums=(3,))


class BertPooler(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, cls_BxD):
    return jnp.tanh(dense(self.cfg, self.cfg.hidden_size, ("embed", "embed_out"), "dense")(cls_BxD))


class BertModel(nn.Module):
  """The encoder: returns {'hidden': BxLxD, 'pooled': BxD (BxSxD with cls_positions)}."""
  config: ModelConfig
  add_pooling_layer: bool = True

  @nn.compact
  def __call__(self, input_ids_BxL, token_type_ids=None, attention_mask=None, *,
               segment_ids=None, position_ids=None, cls_positions=None,
               deterministic: bool = True):
    cfg = self.config
    input_ids_BxL = jnp.asarray(input_ids_BxL, jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids_BxL)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(input_ids_BxL.shape[1]), input_ids_BxL.shape)
    x = BertEmbeddings(cfg, name="embeddings")(input_ids_BxL, token_type_ids, position_ids,
                                               deterministic)
    x = nn.with_logical_constraint(x, ACT_EMBED)
    mask = attention.make_mask(cfg, attention_mask, segment_ids)
    hidden_BxLxD = BertEncoder(cfg, name="encoder")(x, mask, deterministic)
    out = {"hidden": hidden_BxLxD}
    if self.add_pooling_layer:
      if cls_positions is None:
        cls = hidden_BxLxD[:, 0]
      else:
        cls = gather_positions(hidden_BxLxD, cls_positions)
      out["pooled"] = BertPooler(cfg, name="pooler")(cls)
    return out


class TransformHead(nn.Module):
  """cls/predictions/transform: dense, GELU, LayerNorm."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    x = dense(self.cfg, self.cfg.hidden_size, ("embed", "embed_out"), "dense")(x)
    return layer_norm(self.cfg, "LayerNorm")(nn.gelu(x, approximate=False))


class BertLMPredictionHead(nn.Module):
  """transform (dense, GELU, LayerNorm), then the tied decoder plus a vocab bias."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, word_embeddings_VxD):
    cfg = self.cfg
    x = TransformHead(cfg, name="transform")(x)
    zeros = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",))
    bias = self.param("bias", zeros, (cfg.vocab_size,), cfg.weights_dtype)
    return tied_logits(x, word_embeddings_VxD, cfg) + bias.astype(jnp.float32)


class BertPreTrainingHeads(nn.Module):
  """`cls`: MLM predictions, and next-sentence prediction when nsp=True."""
  cfg: ModelConfig
  nsp: bool = True

  @nn.compact
  def __call__(self, sequence_x, word_embeddings_VxD, pooled=None):
    out = {"mlm_logits": BertLMPredictionHead(self.cfg, name="predictions")(
        sequence_x, word_embeddings_VxD)}
    if self.nsp:
      logits = dense(self.cfg, 2, ("embed", "classes"), "seq_relationship")(pooled)
      out["nsp_logits"] = logits.astype(jnp.float32)
    return out


def _word_embeddings(bert: BertModel) -> jax.Array:
  """The tied MLM decoder weight: bert/embeddings/word_embeddings/embedding."""
  table = bert.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
  return nn.meta.unbox(table)


def _mlm_inputs(hidden_BxLxD, masked_positions):
  # Gather before the transform and the vocab projection: only P of L rows pay for them.
  return hidden_BxLxD if masked_positions is None else gather_positions(hidden_BxLxD,
                                                                        masked_positions)


class BertForPreTraining(nn.Module):
  """MLM + NSP. masked_positions (BxP) -> mlm_logits BxPxV, else BxLxV."""
  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids_BxL, token_type_ids=None, attention_mask=None, *,
               segment_ids=None, position_ids=None, cls_positions=None, masked_positions=None,
               deterministic: bool = True):
    bert = BertModel(self.config, name="bert")
    enc = bert(input_ids_BxL, token_type_ids, attention_mask, segment_ids=segment_ids,
               position_ids=position_ids, cls_positions=cls_positions,
               deterministic=deterministic)
    out = BertPreTrainingHeads(self.config, nsp=True, name="cls")(
        _mlm_inputs(enc["hidden"], masked_positions), _word_embeddings(bert), enc["pooled"])
    return {**out, "hidden": enc["hidden"]}


class BertForMaskedLM(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids_BxL, token_type_ids=None, attention_mask=None, *,
               segment_ids=None, position_ids=None, masked_positions=None,
               deterministic: bool = True):
    bert = BertModel(self.config, add_pooling_layer=False, name="bert")
    enc = bert(input_ids_BxL, token_type_ids, attention_mask, segment_ids=segment_ids,
               position_ids=position_ids, deterministic=deterministic)
    out = BertPreTrainingHeads(self.config, nsp=False, name="cls")(
        _mlm_inputs(enc["hidden"], masked_positions), _word_embeddings(bert))
    return {**out, "hidden": enc["hidden"]}


class BertForSequenceClassification(nn.Module):
  """Pooled [CLS] -> dropout -> classifier: logits BxC (C=1: regression)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids_BxL, token_type_ids=None, attention_mask=None, *,
               segment_ids=None, position_ids=None, deterministic: bool = True):
    cfg = self.config
    enc = BertModel(cfg, name="bert")(input_ids_BxL, token_type_ids, attention_mask,
                                      segment_ids=segment_ids, position_ids=position_ids,
                                      deterministic=deterministic)
    x = Dropout(cfg.dropout_rate)(enc["pooled"], deterministic=deterministic)
    logits = dense(cfg, cfg.num_labels, ("embed", "classes"), "classifier")(x)
    return {"logits": logits.astype(jnp.float32), "hidden": enc["hidden"]}


class BertForTokenClassification(nn.Module):
  """Per-token dropout -> classifier: logits BxLxC."""
  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids_BxL, token_type_ids=None, attention_mask=None, *,
               segment_ids=None, position_ids=None, deterministic: bool = True):
    cfg = self.config
    enc = BertModel(cfg, add_pooling_layer=False, name="bert")(
        input_ids_BxL, token_type_ids, attention_mask, segment_ids=segment_ids,
        position_ids=position_ids, deterministic=deterministic)
    x = Dropout(cfg.dropout_rate)(enc["hidden"], deterministic=deterministic)
    logits = dense(cfg, cfg.num_labels, ("embed", "classes"), "classifier")(x)
    return {"logits": logits.astype(jnp.float32), "hidden": enc["hidden"]}


class BertForQuestionAnswering(nn.Module):
  """Span extraction: start_logits and end_logits, each BxL."""
  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids_BxL, token_type_ids=None, attention_mask=None, *,
               segment_ids=None, position_ids=None, deterministic: bool = True):
    cfg = self.config
    enc = BertModel(cfg, add_pooling_layer=False, name="bert")(
        input_ids_BxL, token_type_ids, attention_mask, segment_ids=segment_ids,
        position_ids=position_ids, deterministic=deterministic)
    logits_BxLx2 = dense(cfg, 2, ("embed", "classes"), "qa_outputs")(enc["hidden"])
    logits_BxLx2 = logits_BxLx2.astype(jnp.float32)
    return {"start_logits": logits_BxLx2[..., 0], "end_logits": logits_BxLx2[..., 1],
            "hidden": enc["hidden"]}
