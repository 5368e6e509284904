"""BERT-tiny: 2 layers, hidden 128. Pretrains on a laptop CPU in a few minutes.

Run (offline; the default corpus is the Python documentation that ships with Python):
  plmjax pretrain --config configs/bert_tiny.py --workdir runs/bert_tiny

Expect (measured on a 2-core CPU, about 2 minutes): a unigram tokenizer trained into the
workdir, then 300 steps in which the MLM+NSP loss falls from about 9.7 (steps 1-10) to
about 7.2, MLM accuracy rises from 0.2% to about 5.4% (the frequent-token stage that BERT
pretraining goes through first), and held-out NSP accuracy reaches about 73%; checkpoints
at steps 100, 200, 300 in runs/bert_tiny/checkpoints. Your own text:
  --config.data.train='my/corpus/*.txt'   or   --config.data.train=tfds:wikipedia/20230601.en:train
"""

from plmjax.config import base_config


def get_config():
  c = base_config("bert")
  c.model.update(num_layers=2, hidden_size=128, num_heads=2, intermediate_size=512,
                 vocab_size=8000, max_position_embeddings=128)
  c.data.train = "builtin:python-docs"
  c.data.eval = "builtin:python-docs:eval"
  c.data.max_seq_len = 128
  c.data.max_predictions_per_seq = 20
  c.train.update(steps=300, batch_size=32, learning_rate=1e-3, warmup_steps=30,
                 log_every_steps=10, eval_steps=4)
  c.checkpoint.every_steps = 100
  return c
