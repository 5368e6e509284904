"""STS-B (GLUE): sentence-pair similarity in [0, 5], regression with MSE loss.

Run:
  plmjax finetune --config configs/finetune/stsb.py --init runs/bert_base --workdir runs/stsb

Expect: Pearson and Spearman correlation about 0.88 from BERT-base after 3 epochs.
Local files instead of tfds: fields `text`, `text_b`, `label` (a number).
"""

from plmjax.finetune.tasks import finetune_config


def get_config():
  c = finetune_config(type="regression", labels=(), pairs=True,
                      tfds_fields=dict(text="sentence1", text_b="sentence2"))
  c.data.train = "tfds:glue/stsb:train"
  c.data.eval = "tfds:glue/stsb:validation"
  c.data.max_seq_len = 128
  c.train.update(epochs=3, batch_size=32, learning_rate=2e-5)
  return c
