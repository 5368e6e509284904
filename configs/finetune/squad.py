"""SQuAD v1.1: extractive QA with 384-token windows 128 tokens apart; EM and F1 (percent).

Run:
  plmjax finetune --config configs/finetune/squad.py --init runs/bert_base --workdir runs/squad

Expect: exact_match about 81 and f1 about 88 from BERT-base after 2 epochs. Local .jsonl
lines: {"question": ..., "context": ..., "answers": {"text": [...], "answer_start": [...]}}.
"""

from plmjax.finetune.tasks import finetune_config


def get_config():
  c = finetune_config(type="qa", labels=(), doc_stride=128, max_query_len=64,
                      max_answer_len=30)  # tfds and local files: question, context, answers
  c.data.train = "tfds:squad/v1.1:train"
  c.data.eval = "tfds:squad/v1.1:validation"
  c.data.max_seq_len = 384
  c.train.update(epochs=2, batch_size=32, learning_rate=3e-5)
  c.checkpoint.every_steps = 2000
  return c
