"""CoNLL-2003 NER: a tag per word on its first sub-token, entity-level F1 (seqeval).

Run:
  plmjax finetune --config configs/finetune/conll2003.py --init runs/bert_base_cased \
      --workdir runs/conll2003

Expect: entity F1 about 0.94-0.95 on validation from a cased BERT-base after 3 epochs.
Local files instead of tfds: fields `tokens` (a list of words) and `tags` (one tag name
per word).
"""

from plmjax.finetune.tasks import finetune_config

TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")


def get_config():
  c = finetune_config(type="tagging", labels=TAGS, tfds_fields=dict(label="ner"))
  c.data.train = "tfds:conll2003:train"
  c.data.eval = "tfds:conll2003:dev"
  c.data.max_seq_len = 128
  c.train.update(epochs=3, batch_size=32, learning_rate=5e-5)
  return c
