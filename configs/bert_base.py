"""BERT-base (110M): 12 layers, hidden 768, 12 heads, seq 128 phase of Devlin et al.

Run on a TPU VM or GPU node (bfloat16 compute, float32 master weights):
  plmjax pretrain --config configs/bert_base.py --workdir /mnt/BUCKET/bert_base \
      --config.data.train='tfds:wikipedia/20230601.en:train' --config.data.tokenizer=spm.model

Expect: MLM accuracy around 60-65% and NSP accuracy above 95% after the full run
(BERT paper recipe: 256 x 512 tokens x 1M steps; this config uses batch 256 seq 128).
"""

from plmjax.config import base_config


def get_config():
  c = base_config("bert")
  c.model.update(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072,
                 vocab_size=30522, max_position_embeddings=512, dtype="bfloat16")
  c.data.max_seq_len = 128
  c.data.max_predictions_per_seq = 20
  c.train.update(steps=1_000_000, batch_size=256, learning_rate=1e-4, warmup_steps=10_000,
                 log_every_steps=100, eval_every_steps=10_000, eval_steps=100)
  c.checkpoint.every_steps = 10_000
  return c
