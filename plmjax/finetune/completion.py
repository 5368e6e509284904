"""Prompt -> completion fine-tuning of a GPT LM: features, loss mask, evaluation.

A record {"prompt": P, "completion": C} becomes the tokens  P C <|endoftext|>; a row
reads them as inputs (all but the last) and targets (one token later), and only the
targets that are completion tokens or the final <|endoftext|> carry loss weight:

  inputs   p1 p2 p3 c1 c2        (then padding: <|endoftext|>, weight 0)
  targets  p2 p3 c1 c2 EOT
  weight    0  0  1  1  1

So data.max_seq_len bounds prompt + completion. A longer record loses the start of its
prompt (at least one prompt token stays), then, if still too long, the end of its
completion (and its <|endoftext|> target); such records are counted and reported. An
empty prompt is <|endoftext|>, as GPT-2 starts unconditional text.

data.packing=False (default): one record per row, train.batch_size counts records.
data.packing=True: records are packed in order into rows (segment_ids, position_ids
restarting per record), train.batch_size counts rows.

Evaluation: loss (mean over completion tokens), accuracy (next-token), perplexity, and
greedy generations from the prompts (plmjax.generate.generate_ids, at most
task.max_new_tokens, stopping at <|endoftext|>) scored against the completions:
exact_match (the stripped texts are equal) and rougeL (rouge-score's F-measure, its
default tokenisation: lower-cased alphanumeric words), both means over records in [0, 1].
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from plmjax.errors import ConfigError, DataError
from plmjax.finetune import data
from plmjax.finetune.features import Features
from plmjax.train import sharding
from plmjax.train.objectives import Objective, perplexity, xent_sums


@dataclasses.dataclass
class CompletionFeatures(Features):
  truncated: int = 0  # records cut to fit data.max_seq_len


def field_text(record, field: str, key: str) -> str:
  value = record.get(field, key)
  if not isinstance(value, str):
    raise DataError(f"{record.where}: field {field!r} should be text, got {value!r}")
  return value


def eos_of(tokenizer) -> int:
  if tokenizer.eos_id is None:
    raise DataError(f"tokenizer {tokenizer.path} has no <|endoftext|>: completion "
                    "fine-tuning is for GPT models")
  return tokenizer.eos_id


def prompt_ids(tokenizer, text: str) -> list[int]:
  return list(tokenizer.encode(text)) or [eos_of(tokenizer)]


def fit(prompt: list[int], completion: list[int], max_len: int):
  """(prompt, completion) cut so that len(prompt) + len(completion) - 1 <= max_len
  (`completion` ends with <|endoftext|>, which is only a target)."""
  extra = len(prompt) + len(completion) - 1 - max_len
  if extra > 0:
    cut = min(extra, len(prompt) - 1)
    prompt, extra = prompt[cut:], extra - cut
  if extra > 0:
    completion = completion[:len(completion) - extra]
  return prompt, completion


def featurize(task, tokenizer, records, max_len: int) -> CompletionFeatures:
  """Rows of input_ids, targets, loss_weights (the completion mask) and weights.

  examples[i]: {"prompt_ids": the (cut) prompt, "completion": the reference text}.
  """
  if not records:
    raise DataError("no records to featurise")
  if max_len < 2:
    raise ConfigError(f"config.data.max_seq_len={max_len} is too short for a prompt and "
                      "a completion (at least 2)")
  task = data.task_fields(task, records)
  eos = eos_of(tokenizer)
  prompts = [field_text(r, task.text_field, "config.task.text_field") for r in records]
  completions = [field_text(r, task.label_field, "config.task.label_field") for r in records]
  n = len(records)
  arrays = dict(input_ids=np.full((n, max_len), eos, np.int32),
                targets=np.full((n, max_len), eos, np.int32),
                loss_weights=np.zeros((n, max_len), np.float32),
                weights=np.ones(n, np.float32))
  examples, truncated = [], 0
  encoded = zip(tokenizer.encode_batch(prompts), tokenizer.encode_batch(completions))
  for i, (p, c) in enumerate(encoded):
    p, c = list(p) or [eos], list(c) + [eos]
    p_cut, c_cut = fit(p, c, max_len)
    truncated += (p_cut, c_cut) != (p, c)
    seq = p_cut + c_cut
    arrays["input_ids"][i, :len(seq) - 1] = seq[:-1]
    arrays["targets"][i, :len(seq) - 1] = seq[1:]
    arrays["loss_weights"][i, len(p_cut) - 1:len(seq) - 1] = 1.0
    examples.append(dict(prompt_ids=p_cut, completion=completions[i]))
  return CompletionFeatures(arrays, examples, truncated=truncated)


def pack(arrays: dict) -> dict:
  """Unpacked rows -> rows holding several records each, in order (first fit).

  A record keeps its tokens, targets and weights; segment_ids number the records of a
  row from 1 (0: padding) and position_ids restart at each record.
  """
  input_ids, targets, loss_w = arrays["input_ids"], arrays["targets"], arrays["loss_weights"]
  n, max_len = input_ids.shape
  pad = int(input_ids[0, -1]) if n else 0
  # A record's length: up to its last weighted target (the rest is padding).
  lengths = [int(np.nonzero(w)[0][-1]) + 1 if w.any() else 1 for w in loss_w]
  rows, row, used = [], [], 0
  for i, length in enumerate(lengths):
    if used + length > max_len:
      rows.append(row)
      row, used = [], 0
    row.append(i)
    used += length
  rows.append(row)
  out = dict(input_ids=np.full((len(rows), max_len), pad, np.int32),
             targets=np.full((len(rows), max_len), pad, np.int32),
             loss_weights=np.zeros((len(rows), max_len), np.float32),
             segment_ids=np.zeros((len(rows), max_len), np.int32),
             position_ids=np.zeros((len(rows), max_len), np.int32),
             weights=np.ones(len(rows), np.float32))
  for r, members in enumerate(rows):
    at = 0
    for s, i in enumerate(members, start=1):
      k = lengths[i]
      out["input_ids"][r, at:at + k] = input_ids[i, :k]
      out["targets"][r, at:at + k] = targets[i, :k]
      out["loss_weights"][r, at:at + k] = loss_w[i, :k]
      out["segment_ids"][r, at:at + k] = s
      out["position_ids"][r, at:at + k] = np.arange(k)
      at += k
  return out


# ---- objective (jitted; sums add over batches and devices) ------------------------------

def _weights(batch):
  return batch["loss_weights"].astype(jnp.float32) * batch["weights"].astype(jnp.float32)[:, None]


def _sums(out, batch):
  loss, correct, count = xent_sums(out["logits"], batch["targets"], _weights(batch))
  return dict(loss_sum=loss, correct_sum=correct, count=count)


def _totals(batch):
  return dict(count=_weights(batch).sum())


def _loss(sums, totals):
  """Mean cross-entropy over the batch's completion tokens (as Hugging Face's
  GPT2LMHeadModel with labels -100 outside the completion)."""
  return sums["loss_sum"] / jnp.maximum(totals["count"], 1.0)


def _finalize(sums):
  n = max(float(sums["count"]), 1.0)
  loss = float(sums["loss_sum"]) / n
  return dict(loss=loss, accuracy=float(sums["correct_sum"]) / n, perplexity=perplexity(loss))


OBJECTIVE = Objective(_sums, _totals, _loss, _finalize)


# ---- generation and scores ----------------------------------------------------------------

def complete(model, params, tokenizer, prompts: list[list[int]], max_new_tokens: int, *,
             batch_size: int = 16, num_beams: int = 1) -> list[str]:
  """Greedy (or beam) completions of token-id prompts, as text.

  Prompts longer than the position table allows with `max_new_tokens` lose their start.
  """
  from plmjax.generate import generate_ids  # pylint: disable=g-import-not-at-top
  room = model.config.max_position_embeddings - max_new_tokens
  if room < 1:
    raise ConfigError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                      f"model's {model.config.max_position_embeddings} positions")
  prompts = [list(p)[-room:] for p in prompts]
  eos = eos_of(tokenizer)
  ids = generate_ids(model, params, prompts, max_new_tokens=max_new_tokens, eos_id=eos,
                     pad_id=eos, batch_size=batch_size, num_beams=num_beams)
  return [tokenizer.decode(list(x)) for x in ids]


def scores(predictions: list[str], references: list[str]) -> dict:
  """exact_match (stripped texts equal) and rougeL F-measure, means over records."""
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  scorer = rouge_scorer.RougeScorer(["rougeL"])
  n = max(len(references), 1)
  em = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
  rouge = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references))
  return dict(exact_match=em / n, rougeL=rouge / n)


def generation_evaluator(trainer, arrays: dict, generate, references: list[str]):
  """params -> OBJECTIVE's metrics over `arrays` (eval batches) and exact_match, rougeL of
  generate(params) (texts) against `references`: GPT completions and T5 targets alike."""
  batch_size = trainer.config.train.batch_size

  def evaluate(params) -> dict:
    acc = None
    with trainer.context():
      for batch in data.eval_batches(arrays, batch_size, process_index=jax.process_index(),
                                     process_count=jax.process_count()):
        sums = trainer.eval_step(params, sharding.global_batch(batch, trainer.mesh))
        acc = sums if acc is None else jax.tree.map(jnp.add, acc, sums)
      texts = generate(params)
    return dict(OBJECTIVE.finalize(jax.device_get(acc)), **scores(texts, references))
  return evaluate


def make_evaluate(trainer, task, feats: CompletionFeatures, tokenizer):
  """params -> loss, accuracy, perplexity (completion tokens) and exact_match, rougeL
  of greedy generations, over the whole evaluation set."""
  prompts = [ex["prompt_ids"] for ex in feats.examples]
  generate = lambda params: complete(trainer.model, params, tokenizer, prompts,
                                     task.max_new_tokens,
                                     batch_size=trainer.config.train.batch_size)
  return generation_evaluator(trainer, feats.arrays, generate,
                              [ex["completion"] for ex in feats.examples])
