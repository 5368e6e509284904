"""Prompt -> completion fine-tuning of a GPT-2 LM (loss on the completion and <|endoftext|>).

Run (--init: a GPT workdir, pretrained here or imported from Hugging Face GPT-2):
  plmjax finetune --config configs/finetune/completion.py --init runs/gpt2_small \
      --workdir runs/completion --config.data.train=train.jsonl --config.data.eval=dev.jsonl
  plmjax predict  --workdir runs/completion --input prompts.jsonl --output completions.jsonl
  plmjax generate --workdir runs/completion --prompt "..."
  plmjax export   --workdir runs/completion --out runs/completion/hf   # GPT2LMHeadModel

Records: {"prompt": "...", "completion": "..."} per .jsonl line (a tfds dataset: name its
fields in task.tfds_fields; any source: task.text_field / task.label_field). prompt +
completion are at most data.max_seq_len tokens (longer records lose the prompt's start);
train.batch_size counts records (data.packing=True packs several per row, and then counts
rows). eval_results.json: loss, accuracy, perplexity on completion tokens, exact_match and
rougeL of greedy generations (at most task.max_new_tokens each), in [0, 1].

Expect: on bench/completion_vs_hf.py's synthetic task (reverse 3 words; a 2-layer GPT,
64 steps) exact_match 1.0 from step 32, equal to Hugging Face PyTorch's at every evaluation
with the same weights, data order, batches and steps (0.297 both at step 24).
"""

from plmjax.finetune.tasks import finetune_config


def get_config():
  c = finetune_config(type="completion", max_new_tokens=64)
  c.data.max_seq_len = 256
  c.train.update(epochs=3, batch_size=16, learning_rate=5e-5)
  return c
