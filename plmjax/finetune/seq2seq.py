"""Source -> target fine-tuning of a T5: features, the model as the steps call it, evaluation.

A record {"source": S, "target": T} becomes, as Hugging Face's T5 with `labels`:

  encoder inputs   S </s>             (at most data.max_seq_len tokens, then <pad>)
  decoder inputs   <pad> T            (the targets shifted right after T5's start token)
  targets          T </s>             (at most data.max_target_len tokens, then <pad>)
  loss weight      1 ... 1            (every target token and </s>; padding 0)

A longer source or target loses its end (its </s> stays, as the tokenizer's truncation
keeps it); such records are counted and reported.

plmjax's train and eval steps call every model as model(input_ids, **MODEL_INPUTS), so a
batch carries the encoder and decoder inputs side by side in `input_ids` (B x (S + T)) and
the encoder's padding mask as `attention_mask` (B x S); `Seq2SeqLM`, a T5 with the same
parameter tree, splits them at the mask's width.

Evaluation: loss (mean over target tokens), accuracy (next token), perplexity, and
generations from the sources (plmjax.seq2seq_decoding, greedy, at most
task.max_new_tokens, stopping at </s>) scored against the targets with the completion
task's scorer: exact_match (stripped texts equal) and rougeL (F-measure), means in [0, 1].
"""

import dataclasses

import numpy as np

from plmjax.errors import ConfigError, DataError
from plmjax.finetune import completion, data
from plmjax.finetune.features import Features
from plmjax.models import t5

# The completion task's objective reads the same keys: logits, targets, loss_weights, weights.
OBJECTIVE = completion.OBJECTIVE


@dataclasses.dataclass
class Seq2SeqFeatures(Features):
  truncated: int = 0  # records whose source or target was cut


class Seq2SeqLM(t5.T5ForConditionalGeneration):
  """T5 called as the train and eval steps call every model: input_ids = [encoder inputs |
  decoder inputs], split at the width of attention_mask (the encoder's padding mask)."""

  def __call__(self, input_ids, *, attention_mask, deterministic: bool = True, **unused):
    width = attention_mask.shape[1]
    return super().__call__(input_ids[:, :width], input_ids[:, width:],
                            attention_mask=attention_mask, deterministic=deterministic)


def special_ids(tokenizer) -> tuple[int, int]:
  """(eos, pad) of a T5 tokenizer; pad is also the decoder's start token."""
  if tokenizer.eos_id is None or tokenizer.pad_id is None:
    raise DataError(f"tokenizer {tokenizer.path} has no </s> or <pad>: seq2seq fine-tuning is "
                    "for T5 models and their tokenizers")
  return tokenizer.eos_id, tokenizer.pad_id


def source_ids(tokenizer, text: str, max_len: int) -> list[int]:
  """The encoder's ids: the text's tokens (cut to max_len - 1) and </s>."""
  eos, _ = special_ids(tokenizer)
  return list(tokenizer.encode(text))[:max_len - 1] + [eos]


def featurize(task, tokenizer, records, max_source_len: int,
              max_target_len: int) -> Seq2SeqFeatures:
  """Rows of input_ids ([source | decoder inputs]), attention_mask, targets, loss_weights
  and weights; examples[i] = {"source_ids": the encoder ids, "target": the reference}."""
  if not records:
    raise DataError("no records to featurise")
  if max_source_len < 2 or max_target_len < 2:
    raise ConfigError(f"config.data.max_seq_len={max_source_len} and max_target_len="
                      f"{max_target_len} must both be at least 2 (a token and </s>)")
  task = data.task_fields(task, records)
  eos, pad = special_ids(tokenizer)
  sources = [completion.field_text(r, task.text_field, "config.task.text_field") for r in records]
  targets = [completion.field_text(r, task.label_field, "config.task.label_field")
             for r in records]
  n, s_len, t_len = len(records), max_source_len, max_target_len
  arrays = dict(input_ids=np.full((n, s_len + t_len), pad, np.int32),
                attention_mask=np.zeros((n, s_len), np.int32),
                targets=np.full((n, t_len), pad, np.int32),
                loss_weights=np.zeros((n, t_len), np.float32),
                weights=np.ones(n, np.float32))
  examples, truncated = [], 0
  encoded = zip(tokenizer.encode_batch(sources), tokenizer.encode_batch(targets))
  for i, (src, tgt) in enumerate(encoded):
    truncated += len(src) >= s_len or len(tgt) >= t_len
    src, tgt = list(src)[:s_len - 1] + [eos], list(tgt)[:t_len - 1] + [eos]
    arrays["input_ids"][i, :len(src)] = src
    arrays["attention_mask"][i, :len(src)] = 1
    arrays["input_ids"][i, s_len:s_len + len(tgt)] = [pad] + tgt[:-1]
    arrays["targets"][i, :len(tgt)] = tgt
    arrays["loss_weights"][i, :len(tgt)] = 1.0
    examples.append(dict(source_ids=src, target=targets[i]))
  return Seq2SeqFeatures(arrays, examples, truncated=truncated)


def generate_texts(model, params, tokenizer, sources: list[list[int]], max_new_tokens: int, *,
                   batch_size: int = 16, num_beams: int = 1) -> list[str]:
  """Greedy (or beam) targets of encoder-id sources, as text."""
  from plmjax.seq2seq_decoding import generate_seq2seq_ids  # pylint: disable=g-import-not-at-top
  eos, pad = special_ids(tokenizer)
  ids = generate_seq2seq_ids(model, params, sources, max_new_tokens=max_new_tokens, eos_id=eos,
                             pad_id=pad, batch_size=batch_size, num_beams=num_beams)
  return [tokenizer.decode(list(x)) for x in ids]


def make_evaluate(trainer, task, feats: Seq2SeqFeatures, tokenizer):
  """params -> loss, accuracy, perplexity (target tokens) and exact_match, rougeL of greedy
  generations, over the whole evaluation set."""
  sources = [ex["source_ids"] for ex in feats.examples]
  generate = lambda params: generate_texts(trainer.model, params, tokenizer, sources,
                                           task.max_new_tokens,
                                           batch_size=trainer.config.train.batch_size)
  return completion.generation_evaluator(trainer, feats.arrays, generate,
                                         [ex["target"] for ex in feats.examples])


def predict(model, params, tokenizer, task, records, max_source_len: int, *,
            max_new_tokens: int = 0, batch_size: int = 32, num_beams: int = 1) -> list[dict]:
  """{"target": generated text} per record (sources cut to max_source_len with </s>)."""
  fields = data.task_fields(task, records)
  sources = [source_ids(tokenizer,
                        completion.field_text(r, fields.text_field, "config.task.text_field"),
                        max_source_len) for r in records]
  texts = generate_texts(model, params, tokenizer, sources, max_new_tokens or task.max_new_tokens,
                         batch_size=batch_size, num_beams=num_beams)
  return [dict(target=t) for t in texts]
