"""T5 1.1 base: 12+12 layers, d_model 768, 12 heads of 64, gated-GELU d_ff 2048, untied
output, vocabulary 32128 (32028 pieces + 100 sentinels), ~248M parameters: the sizes of
google/t5-v1_1-base. Inputs of 512 tokens (568 raw, T5's span-corruption lengths) and
targets of 114; no dropout in pretraining, as T5 1.1.

Span-corruption pretraining on C4 (plmjax/data/t5_examples.py), with a T5 tokenizer (Hugging
Face's google/t5-v1_1-base tokenizer.json, or `plmjax tokenizer train --kind t5 --vocab-size
32128`), tokenized once, then trained on the prepared directory:
  plmjax data prepare --input tfds:c4/en:3.0.1:train --tokenizer t5/tokenizer.json \\
      --out c4_t5 --workers 32
  plmjax pretrain --config configs/t5_base.py --workdir runs/t5_base \\
      --config.data.train=c4_t5 --config.data.tokenizer=c4_t5/tokenizer \\
      --config.data.eval='tfds:c4/en:3.0.1:validation[:1%]'
Expect (compiled on a CPU for a v5e-8, not run: `plmjax compile --config configs/t5_base.py
--topology v5e-8`, 2026-11-30): batch 128 fits with 15.41 GiB of 16 per chip (params 0.92,
temp 12.64); a step is 5.45e13 model FLOPs, so at 40% MFU on the 8 chips (197 TFLOP/s
bf16 each) about 86 ms. Not trained here.
A token for tokens/s and MFU is an input or a target token (512 + 114 per row); rows are
packed (data.packing). Throughput of the step alone:
  python bench/pretrain_step.py --config configs/t5_base.py --batch 8
`plmjax import-hf --model t5-v1_1-base-dir ...` gives a workdir of this shape.
"""

from plmjax.config import base_config


def get_config():
  c = base_config("t5")
  c.model.update(num_layers=12, num_decoder_layers=12, hidden_size=768, num_heads=12,
                 intermediate_size=2048, vocab_size=32128, max_position_embeddings=512,
                 dropout_rate=0.0, attention_dropout_rate=0.0, dtype="bfloat16")
  c.data.train = "builtin:python-docs"
  c.data.eval = "builtin:python-docs:eval"
  c.data.max_seq_len = 512
  c.data.max_target_len = 114
  c.data.packing = True  # document tails share rows (t5_examples.py)
  c.train.update(steps=100_000, batch_size=128, learning_rate=1e-3, warmup_steps=10_000,
                 weight_decay=0.0, log_every_steps=100, eval_every_steps=5000, eval_steps=20)
  c.checkpoint.every_steps = 5000
  return c
