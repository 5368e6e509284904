"""BERT-base (110M): 12 layers, hidden 768, 12 heads, seq 128 phase of Devlin et al.

Run on a TPU VM or GPU node (bfloat16 compute, float32 master weights):
  plmjax pretrain --config configs/bert_base.py --workdir /mnt/BUCKET/bert_base \
      --config.data.train='tfds:wikipedia/20230601.en:train' --config.data.tokenizer=spm.model

Expect: MLM accuracy around 60-65% and NSP accuracy above 95% after the full run
(BERT paper recipe: 256 x 512 tokens x 1M steps; this config uses batch 256 seq 128).

The paper's two phases (90% of the steps at seq 128, the last 10% at seq 512): phase 2
starts from phase 1's weights with --init. The position table has
model.max_position_embeddings=512 rows in both phases, so the weights load as they are;
phase 2 takes phase 1's tokenizer and gets a fresh optimizer, learning-rate schedule
(warmup_steps again) and data position:
  plmjax pretrain --config configs/bert_base.py --workdir /mnt/BUCKET/bert_base_p1 \
      --config.data.train='tfds:wikipedia/20230601.en:train' --config.data.tokenizer=spm.model \
      --config.train.steps=900000
  plmjax pretrain --config configs/bert_base.py --workdir /mnt/BUCKET/bert_base_p2 \
      --init /mnt/BUCKET/bert_base_p1 --config.data.train='tfds:wikipedia/20230601.en:train' \
      --config.data.max_seq_len=512 --config.data.max_predictions_per_seq=80 \
      --config.train.steps=100000

Attention dropout is 0 (BERT's recipe has 0.1) so that attention runs as one fused kernel,
splash on TPU and cuDNN on GPU (model.attention_impl=auto), which have no attention dropout.
Cost measured on bert_tiny at 300 steps: none visible (held-out MLM accuracy 5.78% vs 5.80%
with 0.1, mean of 2 seeds; the seeds differ by up to 0.3 points). Gain: bert_base at seq
512, batch 8 per chip, compiled for v5e-8, needs 1.60 GiB of temp memory with splash,
2.30 GiB with xla, 2.58 GiB with xla and attention dropout (bench/RESULTS.md). The paper's
recipe: --config.model.attention_dropout_rate=0.1 (auto then picks xla).
"""

from plmjax.config import base_config


def get_config():
  c = base_config("bert")
  c.model.update(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072,
                 vocab_size=30522, max_position_embeddings=512, dtype="bfloat16",
                 attention_dropout_rate=0.0)
  c.data.max_seq_len = 128
  c.data.max_predictions_per_seq = 20
  c.train.update(steps=1_000_000, batch_size=256, learning_rate=1e-4, warmup_steps=10_000,
                 log_every_steps=100, eval_every_steps=10_000, eval_steps=100)
  c.checkpoint.every_steps = 10_000
  return c
