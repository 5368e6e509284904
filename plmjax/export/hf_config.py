"""ModelConfig <-> Hugging Face `config.json` (BertConfig / GPT2Config / T5Config fields).

Export writes the fields transformers reads for the head's class; import reads
them back and refuses the variants plmjax does not implement (relative position
embeddings, decoders with cross-attention, other activations), naming the key.
"""

from plmjax.errors import UserError
from plmjax.models.config import ModelConfig

# plmjax head -> Hugging Face class (`architectures` in config.json).
BERT_HEAD_CLASSES = {
    "pretraining": "BertForPreTraining",
    "mlm": "BertForMaskedLM",
    "sequence_classification": "BertForSequenceClassification",
    "token_classification": "BertForTokenClassification",
    "question_answering": "BertForQuestionAnswering",
}
GPT_HEAD_CLASSES = {"lm": "GPT2LMHeadModel"}
T5_HEAD_CLASSES = {"seq2seq": "T5ForConditionalGeneration"}

# Hugging Face class -> plmjax head. Base models carry no head: they import as the
# pretraining/LM model with its head initialised (and reported).
HEAD_OF_CLASS = {
    **{cls: head for head, cls in BERT_HEAD_CLASSES.items()},
    "BertModel": "pretraining",
    "GPT2LMHeadModel": "lm",
    "GPT2Model": "lm",
    "T5ForConditionalGeneration": "seq2seq",
}
MODEL_TYPES = {"bert": "bert", "gpt2": "gpt", "t5": "t5"}

# GPT-2's "gelu_new" and PyTorch's tanh GELU are the same function.
_GPT_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class HFConfigError(UserError):
  """A Hugging Face config.json that plmjax cannot represent."""


def hf_class(arch: str, head: str) -> str:
  classes = {"bert": BERT_HEAD_CLASSES, "t5": T5_HEAD_CLASSES}.get(arch, GPT_HEAD_CLASSES)
  if head not in classes:
    raise HFConfigError(f"head {head!r} has no Hugging Face class for arch {arch!r}; "
                        f"exportable heads: {', '.join(classes)}")
  return classes[head]


def to_hf_config(cfg: ModelConfig, head: str, *, dtype: str = "float32",
                 pad_token_id: int | None = None, bos_token_id: int | None = None,
                 eos_token_id: int | None = None,
                 label_names: list[str] | None = None) -> dict:
  """The config.json dict of the head's Hugging Face class."""
  arch_class = hf_class(cfg.arch, head)
  if cfg.arch == "t5":
    return _to_t5_config(cfg, arch_class, dtype, pad_token_id, eos_token_id)
  if cfg.arch == "bert":
    out = dict(
        model_type="bert",
        architectures=[arch_class],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act="gelu",  # exact (erf) GELU, as plmjax's BERT
        hidden_dropout_prob=cfg.dropout_rate,
        attention_probs_dropout_prob=cfg.attention_dropout_rate,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.initializer_range,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=0 if pad_token_id is None else pad_token_id,
        position_embedding_type="absolute",
        classifier_dropout=None,
        use_cache=True,
    )
  else:
    out = dict(
        model_type="gpt2",
        architectures=[arch_class],
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_position_embeddings,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.intermediate_size,
        activation_function="gelu_new",  # tanh GELU, as plmjax's GPT
        resid_pdrop=cfg.dropout_rate,
        embd_pdrop=cfg.dropout_rate,
        attn_pdrop=cfg.attention_dropout_rate,
        layer_norm_epsilon=cfg.layer_norm_eps,
        initializer_range=cfg.initializer_range,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        tie_word_embeddings=True,
        use_cache=True,
    )
    # Explicit even when unknown: GPT2Config's defaults (50256) only fit OpenAI's vocabulary.
    out["bos_token_id"] = bos_token_id if bos_token_id is not None else eos_token_id
    out["eos_token_id"] = eos_token_id if eos_token_id is not None else bos_token_id
    out["pad_token_id"] = pad_token_id
  if head in ("sequence_classification", "token_classification"):
    names = list(label_names) if label_names else [f"LABEL_{i}" for i in range(cfg.num_labels)]
    if len(names) != cfg.num_labels:
      raise HFConfigError(f"{len(names)} label names for config.model.num_labels="
                          f"{cfg.num_labels}; give one name per label")
    out["id2label"] = {str(i): name for i, name in enumerate(names)}
    out["label2id"] = {name: i for i, name in enumerate(names)}
    if cfg.num_labels == 1:
      out["problem_type"] = "regression"
  out["dtype"] = dtype
  return out


def _to_t5_config(cfg: ModelConfig, arch_class: str, dtype: str, pad_token_id: int | None,
                  eos_token_id: int | None) -> dict:
  """T5Config: T5 1.0 (relu, tied) or 1.1 (gated-gelu, untied) by the model's settings."""
  from plmjax.models import t5  # pylint: disable=g-import-not-at-top
  pad = 0 if pad_token_id is None else pad_token_id
  return dict(
      model_type="t5",
      architectures=[arch_class],
      vocab_size=cfg.vocab_size,
      d_model=cfg.hidden_size,
      d_kv=t5.head_dim(cfg),
      d_ff=cfg.intermediate_size,
      num_layers=cfg.num_layers,
      num_decoder_layers=t5.decoder_layers(cfg),
      num_heads=cfg.num_heads,
      relative_attention_num_buckets=cfg.relative_attention_num_buckets,
      relative_attention_max_distance=cfg.relative_attention_max_distance,
      dropout_rate=cfg.dropout_rate,
      layer_norm_epsilon=cfg.layer_norm_eps,
      initializer_factor=cfg.initializer_range,
      feed_forward_proj=cfg.feed_forward_proj,
      # transformers reads false as "no d_model ** -0.5 rescale" and unties lm_head when the
      # file holds one of its own.
      tie_word_embeddings=cfg.tie_word_embeddings,
      is_encoder_decoder=True,
      use_cache=True,
      pad_token_id=pad,
      eos_token_id=1 if eos_token_id is None else eos_token_id,
      decoder_start_token_id=pad,
      dtype=dtype,
  )


def _from_t5_config(hf: dict, source: str) -> dict:
  """ModelConfig values of a T5Config (T5 1.0 and 1.1 layouts, transformers 4 and 5)."""
  ff = hf.get("feed_forward_proj", "relu")
  if ff == "gated-gelu" and hf.get("dense_act_fn", "gelu_new") not in _GPT_ACTIVATIONS:
    raise HFConfigError(f"{source}: dense_act_fn={hf['dense_act_fn']!r} with gated-gelu is not "
                        "supported by plmjax (supported: gelu_new)")
  _require(hf, "feed_forward_proj", ("relu", "gated-gelu"), "relu", source)
  d_model, heads = _get(hf, "d_model", source), _get(hf, "num_heads", source)
  d_kv = _get(hf, "d_kv", source)
  layers = _get(hf, "num_layers", source)
  dropout = float(hf.get("dropout_rate", 0.1))
  # transformers 5 saves the rescale as scale_decoder_outputs; older files say it with
  # tie_word_embeddings. No rescale: plmjax's untied model (HF's output projection).
  scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
  return dict(
      arch="t5",
      vocab_size=_get(hf, "vocab_size", source),
      hidden_size=d_model,
      num_layers=layers,
      num_decoder_layers=0 if hf.get("num_decoder_layers") in (None, layers)
      else hf["num_decoder_layers"],
      num_heads=heads,
      attention_head_dim=0 if d_kv * heads == d_model else d_kv,
      intermediate_size=_get(hf, "d_ff", source),
      max_position_embeddings=int(hf.get("n_positions", 512)),
      relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
      feed_forward_proj=ff,
      tie_word_embeddings=bool(scale),
      dropout_rate=dropout,
      attention_dropout_rate=dropout,
      layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
      initializer_range=float(hf.get("initializer_factor", 1.0)),
  )


def _get(hf: dict, key: str, source: str, default=None):
  if key in hf:
    return hf[key]
  if default is None:
    raise HFConfigError(f"{source} has no {key!r}; a BERT, GPT-2 or T5 config.json needs it")
  return default


def _require(hf: dict, key: str, allowed, default, source: str):
  value = hf.get(key, default)
  if value not in allowed:
    raise HFConfigError(f"{source}: {key}={value!r} is not supported by plmjax "
                        f"(supported: {', '.join(map(repr, allowed))})")


def arch_and_class(hf: dict, source: str = "config.json") -> tuple[str, str]:
  """(plmjax arch, Hugging Face class) of a config.json; unsupported ones are errors."""
  model_type = hf.get("model_type")
  classes = list(hf.get("architectures") or [])
  if model_type not in MODEL_TYPES:
    raise HFConfigError(
        f"{source}: model_type={model_type!r} (architectures {classes}) is not supported; "
        "plmjax imports BERT (model_type 'bert'), GPT-2 ('gpt2') and T5 ('t5') models")
  arch = MODEL_TYPES[model_type]
  if not classes:
    return arch, {"bert": "BertModel", "t5": "T5ForConditionalGeneration"}.get(arch, "GPT2Model")
  cls = classes[0]
  prefix = {"bert": "Bert", "gpt": "GPT2", "t5": "T5"}[arch]
  if cls not in HEAD_OF_CLASS or not cls.startswith(prefix):
    supported = [c for c in HEAD_OF_CLASS if c.startswith(prefix)]
    raise HFConfigError(f"{source}: architecture {cls!r} is not supported; plmjax imports "
                        f"{', '.join(supported)}")
  return arch, cls


def from_hf_config(hf: dict, source: str = "config.json") -> tuple[ModelConfig, str, str]:
  """(ModelConfig, plmjax head, Hugging Face class) from a config.json dict."""
  arch, cls = arch_and_class(hf, source)
  head = HEAD_OF_CLASS[cls]
  num_labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
  if arch == "t5":
    values = _from_t5_config(hf, source)
  elif arch == "bert":
    _require(hf, "hidden_act", ("gelu",), "gelu", source)
    _require(hf, "position_embedding_type", ("absolute",), "absolute", source)
    _require(hf, "is_decoder", (False,), False, source)
    _require(hf, "add_cross_attention", (False,), False, source)
    values = dict(
        arch="bert",
        vocab_size=_get(hf, "vocab_size", source),
        hidden_size=_get(hf, "hidden_size", source),
        num_layers=_get(hf, "num_hidden_layers", source),
        num_heads=_get(hf, "num_attention_heads", source),
        intermediate_size=_get(hf, "intermediate_size", source),
        max_position_embeddings=_get(hf, "max_position_embeddings", source, 512),
        type_vocab_size=_get(hf, "type_vocab_size", source, 2),
        dropout_rate=float(hf.get("hidden_dropout_prob", 0.1)),
        attention_dropout_rate=float(hf.get("attention_probs_dropout_prob", 0.1)),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        num_labels=num_labels,
    )
  else:
    _require(hf, "activation_function", _GPT_ACTIVATIONS, "gelu_new", source)
    _require(hf, "scale_attn_weights", (True,), True, source)
    _require(hf, "scale_attn_by_inverse_layer_idx", (False,), False, source)
    _require(hf, "add_cross_attention", (False,), False, source)
    _require(hf, "tie_word_embeddings", (True,), True, source)
    hidden = _get(hf, "n_embd", source)
    values = dict(
        arch="gpt",
        vocab_size=_get(hf, "vocab_size", source),
        hidden_size=hidden,
        num_layers=_get(hf, "n_layer", source),
        num_heads=_get(hf, "n_head", source),
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        max_position_embeddings=_get(hf, "n_positions", source, 1024),
        dropout_rate=float(hf.get("resid_pdrop", 0.1)),
        attention_dropout_rate=float(hf.get("attn_pdrop", 0.1)),
        layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )
  try:
    return ModelConfig(**values), head, cls
  except UserError as e:
    raise HFConfigError(f"{source}: {e}") from e


def label_names(hf: dict) -> list[str] | None:
  """id2label of a classification config, in id order (None when absent)."""
  id2label = hf.get("id2label")
  if not id2label:
    return None
  return [id2label[k] for k in sorted(id2label, key=int)]
