"""Source -> target fine-tuning of a T5 (loss on the target tokens and </s>).

Run (--init: a T5 workdir, pretrained here or imported from Hugging Face T5):
  plmjax finetune --config configs/finetune/seq2seq.py --init runs/t5_small \
      --workdir runs/seq2seq --config.data.train=train.jsonl --config.data.eval=dev.jsonl
  plmjax predict  --workdir runs/seq2seq --input sources.jsonl --output targets.jsonl
  plmjax generate --workdir runs/seq2seq --prompt "..."
  plmjax export   --workdir runs/seq2seq --out runs/seq2seq/hf   # T5ForConditionalGeneration

Records: {"source": "...", "target": "..."} per .jsonl line (any source: name the fields in
task.text_field / task.label_field; a tfds dataset: task.tfds_fields, e.g. for
tfds:cnn_dailymail:train text="article", label="highlights"). Sources are cut to
data.max_seq_len tokens and targets to data.max_target_len (each with its </s>);
train.batch_size counts records (with --config.data.packing=true, short records share rows
and it counts rows). eval_results.json: loss, accuracy, perplexity on target
tokens, exact_match and rougeL of greedy generations (at most task.max_new_tokens each),
in [0, 1].

Expect: a random 2+2-layer T5 1.1 (hidden 64) learns to reverse 2 one-token words (512
records, 64 steps of 32 at lr 3e-3, dropout 0; tests/test_seq2seq.py's task) to eval loss
0.26, exact_match 0.69, rougeL 0.84 in about 20 s on a 2-core CPU.
"""

from plmjax.finetune.tasks import finetune_config


def get_config():
  c = finetune_config(type="seq2seq", max_new_tokens=64)
  c.data.max_seq_len = 256
  c.data.max_target_len = 64
  c.train.update(epochs=3, batch_size=16, learning_rate=3e-4)
  return c
