"""Models: BERT, GPT-2 and T5 in flax.linen, and `build_model` to pick one by head."""

import flax.linen as nn

from plmjax.errors import ConfigError
from plmjax.models import bert, gpt, t5
from plmjax.models.config import ModelConfig

# arch -> head name -> model class (each takes the ModelConfig as its only argument).
HEADS = {
    "bert": {
        "pretraining": bert.BertForPreTraining,
        "mlm": bert.BertForMaskedLM,
        "sequence_classification": bert.BertForSequenceClassification,
        "token_classification": bert.BertForTokenClassification,
        "question_answering": bert.BertForQuestionAnswering,
    },
    "gpt": {
        "lm": gpt.GPT,
    },
    "t5": {
        "seq2seq": t5.T5ForConditionalGeneration,
    },
}


def build_model(cfg: ModelConfig, head: str) -> nn.Module:
  """The flax module for `cfg.arch` with the given head."""
  heads = HEADS[cfg.arch]
  if head not in heads:
    raise ConfigError(f"head {head!r} is not available for config.model.arch={cfg.arch!r}; "
                      f"use one of: {', '.join(heads)}.")
  return heads[head](cfg)
