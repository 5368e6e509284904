"""GPT-2 small (124M): 12 layers, hidden 768, seq 1024, bfloat16.

Run:
  plmjax pretrain --config configs/gpt2_small.py --workdir /mnt/BUCKET/gpt2_small \
      --config.data.train='tfds:openwebtext:train' --config.data.tokenizer=spm.model

Expect: validation loss near 3.3 after ~10B tokens (nanoGPT's figure for OpenWebText).

Dropout is 0, attention dropout too (as nanoGPT): fused kernels have no attention-probability
dropout, so with it at 0 model.attention_impl=auto picks splash on TPU (packed rows as segment
ids). On GPU these packed rows run xla, as cuDNN takes no segment ids; --config.data.packing=false
gives cuDNN (padding as lengths) at the cost of padded rows (bench/RESULTS.md).
"""

from plmjax.config import base_config


def get_config():
  c = base_config("gpt")
  c.model.update(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072,
                 vocab_size=50257, max_position_embeddings=1024, dtype="bfloat16",
                 dropout_rate=0.0, attention_dropout_rate=0.0)
  c.data.tokenizer_model_type = "bpe"
  c.data.max_seq_len = 1024
  c.data.packing = True
  c.train.update(steps=600_000, batch_size=480, learning_rate=6e-4, warmup_steps=2000,
                 decay="cosine", end_learning_rate_ratio=0.1, weight_decay=0.1,
                 adam_b2=0.95, adam_eps=1e-8, log_every_steps=100,
                 eval_every_steps=2000, eval_steps=50)
  c.checkpoint.every_steps = 2000
  return c
