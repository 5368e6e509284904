"""GPT-2 medium (350M): 24 layers, hidden 1024, 16 heads, seq 1024, bfloat16, FSDP.

Run:
  plmjax pretrain --config configs/gpt2_medium.py --workdir /mnt/BUCKET/gpt2_medium \
      --config.data.train='tfds:openwebtext:train' --config.data.tokenizer=spm.model \
      --config.mesh.fsdp=8

Tensor parallelism (Megatron): --config.mesh.tensor=N (N divides the 16 heads; the rest of
the devices go to mesh.data, or set mesh.fsdp too) splits every layer's heads and MLP over N
devices. Each device computes whole heads, so a layer costs one all-reduce in attention and
one in the MLP, forward and backward, and no all-gather. Compiled on this CPU for a v5e-8:

  plmjax compile --config configs/gpt2_medium.py --topology v5e-8 \
      --config.mesh.tensor=4 --config.mesh.data=2 --config.train.batch_size=32

  per chip 8.5 GiB of 16 (params 0.48, opt_state 0.96, temp 7.05); all-reduce 102
  (4 per layer x 24 + 6), all-gather 0, collective-permute 0.

Faster compiles: --config.model.scan_layers=true runs the 24 blocks under nn.scan (parameters
and KV cache stacked per layer; export/import and generate work as before). With
--config.mesh.fsdp=8 --config.mesh.data=1 --config.train.batch_size=32, compiled for v5e-8 on
a loaded 2-core CPU: 111 s instead of 419 s (CPU time 44 s vs 147 s), temp 4.91 GiB instead
of 5.11 GiB per chip. With the tensor-parallel command above it compiles in 91 s instead of
340 s but needs 10.24 GiB of temp per chip instead of 7.05.

Dropout is 0, attention dropout too (as nanoGPT): fused kernels have no attention-probability
dropout, so with it at 0 model.attention_impl=auto picks splash on TPU (packed rows as segment
ids). On GPU these packed rows run xla, as cuDNN takes no segment ids; --config.data.packing=false
gives cuDNN (padding as lengths) at the cost of padded rows.

Expect: validation loss near 2.9 after ~30B tokens.
"""

from plmjax.config import base_config


def get_config():
  c = base_config("gpt")
  c.model.update(num_layers=24, hidden_size=1024, num_heads=16, intermediate_size=4096,
                 vocab_size=50257, max_position_embeddings=1024, dtype="bfloat16",
                 dropout_rate=0.0, attention_dropout_rate=0.0, remat="dots")
  c.data.tokenizer_model_type = "bpe"
  c.data.max_seq_len = 1024
  c.data.packing = True
  c.train.update(steps=600_000, batch_size=480, learning_rate=3e-4, warmup_steps=2000,
                 decay="cosine", end_learning_rate_ratio=0.1, weight_decay=0.1,
                 adam_b2=0.95, adam_eps=1e-8, log_every_steps=100,
                 eval_every_steps=2000, eval_steps=50)
  c.checkpoint.every_steps = 2000
  return c
