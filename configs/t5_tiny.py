"""T5-tiny: T5 1.1 layout (gated-GELU, untied output), 2+2 layers, hidden 128. CPU, minutes.

Span-corruption pretraining, offline on the built-in corpus (the Python documentation);
trains a T5 tokenizer (kind t5, vocab 8000 with the 100 sentinels) into the workdir first:
  plmjax pretrain --config configs/t5_tiny.py --workdir runs/t5_tiny
Inputs of 128 tokens hold 141 raw tokens with 21 of them (in 7 spans) moved to the
targets of 29 tokens (plmjax.data.span_corruption.lengths(128, 32)); rows are packed.
Expect (2-core CPU, 2026-11-30): 300 steps in about 1.5 min (4 steps/s, 21k tokens/s,
a token = an input or a target token); the loss (per target token) falls from ~42 (HF's
T5 init) to 7.47 at step 300, token accuracy 0.24; eval loss 7.64, accuracy 0.24.
Then: plmjax export --workdir runs/t5_tiny --out runs/t5_tiny/hf (T5ForConditionalGeneration).
"""

from plmjax.config import base_config


def get_config():
  c = base_config("t5")
  c.model.update(num_layers=2, num_decoder_layers=2, hidden_size=128, num_heads=2,
                 intermediate_size=256, vocab_size=8000, max_position_embeddings=128,
                 dropout_rate=0.0, attention_dropout_rate=0.0)
  c.data.train = "builtin:python-docs"
  c.data.eval = "builtin:python-docs:eval"
  c.data.max_seq_len = 128
  c.data.max_target_len = 32
  c.data.packing = True  # document tails share rows (t5_examples.py)
  c.train.update(steps=300, batch_size=32, learning_rate=1e-3, warmup_steps=30,
                 log_every_steps=10, eval_steps=4)
  c.checkpoint.every_steps = 100
  return c
