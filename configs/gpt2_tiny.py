"""GPT-2-tiny: 2 layers, hidden 128, causal LM with sequence packing. Laptop CPU, minutes.

Run (offline; the default corpus is the Python documentation that ships with Python):
  plmjax pretrain --config configs/gpt2_tiny.py --workdir runs/gpt2_tiny

Expect (measured on a 2-core CPU, about 3.5 minutes): a BPE tokenizer trained into the
workdir, then 300 steps with the loss falling from about 8.9 (steps 1-10) to about 5.9
(perplexity about 370, held-out about 395, next-token accuracy 12-13%); then
  plmjax generate --workdir runs/gpt2_tiny --prompt "The list" --temperature 0
prints mostly repeated phrases ('The list of the "x" is a string. The "x" is a string is
a string. ...'), as a 1.5M parameter model after 300 steps does.
"""

from plmjax.config import base_config


def get_config():
  c = base_config("gpt")
  c.model.update(num_layers=2, hidden_size=128, num_heads=2, intermediate_size=512,
                 vocab_size=8000, max_position_embeddings=128)
  c.data.train = "builtin:python-docs"
  c.data.eval = "builtin:python-docs:eval"
  c.data.tokenizer_model_type = "bpe"
  c.data.max_seq_len = 128
  c.data.packing = True
  c.train.update(steps=300, batch_size=32, learning_rate=1e-3, warmup_steps=30,
                 log_every_steps=10, eval_steps=4, adam_b2=0.95, weight_decay=0.1)
  c.checkpoint.every_steps = 100
  return c
