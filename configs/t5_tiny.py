"""T5-tiny: T5 1.1 layout (gated-GELU, untied output), 2+2 layers, hidden 128. CPU, minutes.

Span-corruption pretraining is not wired into `plmjax pretrain` yet (the data pipeline
comes next); what works today: the model (tests/test_t5.py builds this config), and
  plmjax tokenizer train --kind t5 --input builtin:python-docs --vocab-size 8000 --out tok/t5
  (then `plmjax import-hf` / `plmjax export` for T5 workdirs; see the README's T5 section)
Planned run (offline; the built-in corpus is the Python documentation):
  plmjax pretrain --config configs/t5_tiny.py --workdir runs/t5_tiny
Inputs of 128 tokens hold 141 raw tokens with 21 of them (in 7 spans) moved to the
targets of 29 tokens (plmjax.data.span_corruption.lengths(128, 32)). Not measured yet.
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
