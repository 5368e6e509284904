"""ModelConfig <-> Hugging Face config.json."""

import dataclasses

import pytest
import transformers

from hf_helpers import tiny_config
from plmjax.errors import UserError
from plmjax.export import hf_config

HEADS = [("bert", "pretraining"), ("bert", "mlm"), ("bert", "sequence_classification"),
         ("bert", "token_classification"), ("bert", "question_answering"), ("gpt", "lm")]


@pytest.mark.parametrize("arch,head", HEADS)
def test_round_trip_through_transformers(arch, head):
  cfg = tiny_config(arch, dropout_rate=0.05, attention_dropout_rate=0.2, initializer_range=0.03)
  hf = hf_config.to_hf_config(cfg, head)
  # transformers reads it back and writes the same values (and its own defaults).
  hf_back = transformers.AutoConfig.for_model(**hf).to_dict()
  got, got_head, cls = hf_config.from_hf_config(hf_back)
  # num_labels travels only with classification heads (else transformers' default 2).
  assert got == (cfg if "classification" in head else dataclasses.replace(cfg, num_labels=2))
  assert got_head == head and cls == hf["architectures"][0]


def test_label_names_and_regression():
  cfg = tiny_config("bert", num_labels=3)
  hf = hf_config.to_hf_config(cfg, "sequence_classification", label_names=["neg", "neu", "pos"])
  assert hf["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
  assert hf_config.label_names(hf) == ["neg", "neu", "pos"]
  one = hf_config.to_hf_config(tiny_config("bert", num_labels=1), "sequence_classification")
  assert one["problem_type"] == "regression"
  with pytest.raises(UserError, match="2 label names"):
    hf_config.to_hf_config(cfg, "sequence_classification", label_names=["a", "b"])


def test_base_models_import_as_pretraining_and_lm():
  bert = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32).to_dict()
  bert["architectures"] = ["BertModel"]
  cfg, head, cls = hf_config.from_hf_config(bert)
  assert (cfg.arch, cfg.num_layers, head, cls) == ("bert", 1, "pretraining", "BertModel")
  gpt = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50).to_dict()
  del gpt["architectures"]
  cfg, head, cls = hf_config.from_hf_config(gpt)
  assert (cfg.arch, cfg.intermediate_size, head, cls) == ("gpt", 64, "lm", "GPT2Model")


@pytest.mark.parametrize("change,match", [
    (dict(model_type="roberta"), "model_type='roberta'"),
    (dict(architectures=["BertForMultipleChoice"]), "BertForMultipleChoice"),
    (dict(position_embedding_type="relative_key"), "position_embedding_type"),
    (dict(hidden_act="relu"), "hidden_act='relu'"),
    (dict(is_decoder=True), "is_decoder"),
    (dict(num_attention_heads=5), "num_heads"),
])
def test_unsupported_configs_are_refused(change, match):
  hf = hf_config.to_hf_config(tiny_config("bert"), "mlm")
  hf.update(change)
  with pytest.raises(UserError, match=match):
    hf_config.from_hf_config(hf, "x/config.json")
