"""MNLI (GLUE): premise/hypothesis pairs, 3 classes, accuracy on validation_matched.

Run:
  plmjax finetune --config configs/finetune/mnli.py --init runs/bert_base --workdir runs/mnli

Expect: about 84% matched accuracy from BERT-base after 3 epochs. Local files instead
of tfds: fields `text`, `text_b`, `label`. For another GLUE pair task (QQP, MRPC, RTE...)
change data.*, task.labels and task.tfds_fields; MRPC and QQP add `f1` to task.metrics,
CoLA (single sentence) uses pairs=False, metrics=("matthews_corr",).
"""

from plmjax.finetune.tasks import finetune_config


def get_config():
  c = finetune_config(type="classification", labels=("entailment", "neutral", "contradiction"),
                      pairs=True, tfds_fields=dict(text="premise", text_b="hypothesis"),
                      metrics=("accuracy",))
  c.data.train = "tfds:glue/mnli:train"
  c.data.eval = "tfds:glue/mnli:validation_matched"
  c.data.max_seq_len = 128
  c.train.update(epochs=3, batch_size=32, learning_rate=2e-5)
  c.checkpoint.every_steps = 2000
  return c
