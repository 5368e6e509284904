"""Source -> target fine-tuning of a T5: features, the model as the steps call it, evaluation.

A record {"source": S, "target": T} becomes, as Hugging Face's T5 with `labels`:

  encoder inputs   S </s>             (at most data.max_seq_len tokens, then <pad>)
  decoder inputs   <pad> T            (the targets shifted right after T5's start token)
  targets          T </s>             (at most data.max_target_len tokens, then <pad>)
  loss weight      1 ... 1            (every target token and </s>; padding 0)

A longer source or target loses its end (its </s> stays, as the tokenizer's truncation
keeps it); such records are counted and reported.

The batch keys are those of T5 pretraining (plmjax/data/t5_examples.py): input_ids and
attention_mask (B x S), decoder_input_ids, targets and loss_weights (B x T), so the train
and eval steps call the plain T5ForConditionalGeneration. With data.packing (train split
only), `pack` puts several records in a row, in order, while both their sources fit S
and their targets fit T: encoder_segment_ids/decoder_segment_ids number them from 1 (0:
padding), positions restart at each record, and attention stays within a record; then
train.batch_size counts rows.

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

# The completion task's objective reads the same keys: logits, targets, loss_weights, weights.
OBJECTIVE = completion.OBJECTIVE


@dataclasses.dataclass
class Seq2SeqFeatures(Features):
  truncated: int = 0  # records whose source or target was cut


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
  """Rows of input_ids, attention_mask, decoder_input_ids, targets, loss_weights and
  weights; examples[i] = {"source_ids": the encoder ids, "target": the reference}."""
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
  arrays = dict(input_ids=np.full((n, s_len), pad, np.int32),
                attention_mask=np.zeros((n, s_len), np.int32),
                decoder_input_ids=np.full((n, t_len), pad, np.int32),
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
    arrays["decoder_input_ids"][i, :len(tgt)] = [pad] + tgt[:-1]
    arrays["targets"][i, :len(tgt)] = tgt
    arrays["loss_weights"][i, :len(tgt)] = 1.0
    examples.append(dict(source_ids=src, target=targets[i]))
  return Seq2SeqFeatures(arrays, examples, truncated=truncated)


def pack(arrays: dict, pad_id: int) -> dict:
  """Unpacked rows -> rows holding several records each, in order: a record joins the
  current row while its source and its target both fit, else it opens the next row."""
  n, s_len = arrays["input_ids"].shape
  t_len = arrays["targets"].shape[1]
  src_len = arrays["attention_mask"].sum(axis=1).tolist()
  tgt_len = (arrays["loss_weights"] > 0).sum(axis=1).tolist()
  rows, row, used_s, used_t = [], [], 0, 0
  for i in range(n):
    if row and (used_s + src_len[i] > s_len or used_t + tgt_len[i] > t_len):
      rows.append(row)
      row, used_s, used_t = [], 0, 0
    row.append(i)
    used_s, used_t = used_s + src_len[i], used_t + tgt_len[i]
  rows.append(row)
  pad, m = pad_id, len(rows)
  out = dict(input_ids=np.full((m, s_len), pad, np.int32),
             encoder_segment_ids=np.zeros((m, s_len), np.int32),
             encoder_positions=np.zeros((m, s_len), np.int32),
             decoder_input_ids=np.full((m, t_len), pad, np.int32),
             targets=np.full((m, t_len), pad, np.int32),
             loss_weights=np.zeros((m, t_len), np.float32),
             decoder_segment_ids=np.zeros((m, t_len), np.int32),
             decoder_positions=np.zeros((m, t_len), np.int32),
             weights=np.ones(m, np.float32))
  for r, members in enumerate(rows):
    at_s = at_t = 0
    for k, i in enumerate(members, start=1):
      a, b = src_len[i], tgt_len[i]
      out["input_ids"][r, at_s:at_s + a] = arrays["input_ids"][i, :a]
      out["encoder_segment_ids"][r, at_s:at_s + a] = k
      out["encoder_positions"][r, at_s:at_s + a] = np.arange(a)
      for key in ("decoder_input_ids", "targets", "loss_weights"):
        out[key][r, at_t:at_t + b] = arrays[key][i, :b]
      out["decoder_segment_ids"][r, at_t:at_t + b] = k
      out["decoder_positions"][r, at_t:at_t + b] = np.arange(b)
      at_s, at_t = at_s + a, at_t + b
  return out


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
