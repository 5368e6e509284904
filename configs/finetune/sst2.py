"""SST-2 (GLUE): single-sentence sentiment, 2 classes, accuracy.

Run (the tfds glue/sst2 dataset prepared beforehand; --init is a pretrained or imported BERT):
  plmjax finetune --config configs/finetune/sst2.py --init runs/bert_base --workdir runs/sst2

Expect: about 92-93% validation accuracy from BERT-base after 3 epochs
(runs/sst2/eval_results.json). Local files instead of tfds (fields `text`, `label`):
  --config.data.train=train.jsonl --config.data.eval=dev.jsonl
"""

from plmjax.finetune.tasks import finetune_config


def get_config():
  c = finetune_config(type="classification", labels=("negative", "positive"),
                      tfds_fields=dict(text="sentence"), metrics=("accuracy",))
  c.data.train = "tfds:glue/sst2:train"
  c.data.eval = "tfds:glue/sst2:validation"
  c.data.max_seq_len = 64
  c.train.update(epochs=3, batch_size=32, learning_rate=2e-5)
  return c
