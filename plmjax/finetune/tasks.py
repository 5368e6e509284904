"""Per task type: the model head, the training objective, and the evaluation metrics.

  type            head                      loss                         metrics
  classification  sequence_classification   cross-entropy                accuracy (+ f1,
                                                                         matthews_corr)
  regression      sequence_classification   mean squared error           pearson, spearman
  tagging         token_classification      cross-entropy, first         precision, recall,
                                            sub-token of each word       f1 (entities), accuracy
  qa              question_answering        start + end cross-entropy/2  exact_match, f1
  completion      lm (GPT)                  cross-entropy on the         loss, perplexity,
                                            completion and <|endoftext|> exact_match, rougeL
  seq2seq         seq2seq (T5)              cross-entropy on the         loss, perplexity,
                                            target tokens and </s>       exact_match, rougeL

The objective's sums drive training and are logged under compute_metrics' names
(loss, accuracy; qa: start_accuracy, end_accuracy); the task metrics need every
prediction, so `evaluate` runs the model over the whole validation set.
"""

import jax.numpy as jnp
import numpy as np

from plmjax.errors import ConfigError
from plmjax.finetune import completion
from plmjax.finetune import features as features_lib
from plmjax.finetune import metrics
from plmjax.finetune import seq2seq
from plmjax.train.objectives import Objective, xent_sums

HEADS = {"classification": "sequence_classification", "regression": "sequence_classification",
         "tagging": "token_classification", "qa": "question_answering", "completion": "lm",
         "seq2seq": "seq2seq"}
# The model a task type fine-tunes (config.model.arch of --init).
ARCHS = {t: {"completion": "gpt", "seq2seq": "t5"}.get(t, "bert") for t in HEADS}
# Task types whose evaluation and predict generate text (task.max_new_tokens).
GENERATIVE = ("completion", "seq2seq")
# Model outputs the evaluation reads.
OUTPUTS = {"classification": ("logits",), "regression": ("logits",), "tagging": ("logits",),
           "qa": ("start_logits", "end_logits"), "completion": ("logits",),
           "seq2seq": ("logits",)}
OPTIONAL_METRICS = ("f1", "matthews_corr")  # classification extras, chosen by task.metrics


def check_task_type(task):
  if task.type not in HEADS:
    raise ConfigError(f"config.task.type={task.type!r} is not allowed; use "
                      f"{', '.join(HEADS)}")


def check_task(task):
  check_task_type(task)
  if task.type in ("classification", "tagging") and len(task.labels) < 2:
    raise ConfigError(f"config.task.labels={tuple(task.labels)!r}: a {task.type} task needs "
                      "at least two label names")
  if task.type in GENERATIVE and task.max_new_tokens < 1:
    raise ConfigError(f"config.task.max_new_tokens={task.max_new_tokens} must be at least 1 "
                      "(tokens generated per prompt in evaluation and predict)")
  for name in task.metrics:
    if name not in ("accuracy",) + OPTIONAL_METRICS:
      raise ConfigError(f"config.task.metrics has {name!r}; classification extras are "
                        f"{', '.join(OPTIONAL_METRICS)} (other task types report all of theirs)")


def num_labels(task) -> int:
  return 1 if task.type == "regression" else max(len(task.labels), 1)


# ---- objectives (jitted; sums are additive over batches and devices) -------------------

def _count(batch):
  return dict(count=batch["weights"].astype(jnp.float32).sum())


def _mean_loss(sums, totals):
  return sums["loss_sum"] / jnp.maximum(totals["count"], 1.0)


def _finalize(**ratios):
  """Metric name -> sums key, each divided by the count; `loss` from `loss_sum`.

  The names are compute_metrics'. No sums key is called `loss`: the train step adds
  its mean loss to the same metrics dict.
  """
  def finalize(sums):
    n = max(float(sums["count"]), 1.0)
    return {name: float(sums[key]) / n for name, key in dict(loss="loss_sum", **ratios).items()}
  return finalize


def _classification_sums(out, batch):
  w = batch["weights"].astype(jnp.float32)
  loss, correct, count = xent_sums(out["logits"], batch["labels"], w)
  return dict(loss_sum=loss, correct_sum=correct, count=count)


def _regression_sums(out, batch):
  w = batch["weights"].astype(jnp.float32)
  err = out["logits"][:, 0] - batch["labels"].astype(jnp.float32)
  return dict(loss_sum=(err * err * w).sum(), count=w.sum())


def _tag_weights(batch):
  return (batch["labels"] >= 0) * batch["weights"].astype(jnp.float32)[:, None]


def _tagging_sums(out, batch):
  loss, correct, count = xent_sums(out["logits"], jnp.maximum(batch["labels"], 0),
                                   _tag_weights(batch))
  return dict(loss_sum=loss, correct_sum=correct, count=count)


def _tagging_totals(batch):
  return dict(count=_tag_weights(batch).sum())


def _qa_sums(out, batch):
  w = batch["weights"].astype(jnp.float32)
  start_loss, start_correct, count = xent_sums(out["start_logits"], batch["start_positions"], w)
  end_loss, end_correct, _ = xent_sums(out["end_logits"], batch["end_positions"], w)
  return dict(loss_sum=(start_loss + end_loss) / 2, start_correct_sum=start_correct,
              end_correct_sum=end_correct, count=count)


OBJECTIVES = {
    "classification": Objective(_classification_sums, _count, _mean_loss,
                                _finalize(accuracy="correct_sum")),
    "regression": Objective(_regression_sums, _count, _mean_loss, _finalize()),
    "tagging": Objective(_tagging_sums, _tagging_totals, _mean_loss,
                         _finalize(accuracy="correct_sum")),
    "qa": Objective(_qa_sums, _count, _mean_loss,
                    _finalize(start_accuracy="start_correct_sum",
                              end_accuracy="end_correct_sum")),
    "completion": completion.OBJECTIVE,
    "seq2seq": seq2seq.OBJECTIVE,
}


# ---- evaluation on host ------------------------------------------------------------------

def _nll(logits_NxC, labels_N) -> np.ndarray:
  z = logits_NxC - logits_NxC.max(axis=-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
  return -np.take_along_axis(logp, labels_N[..., None], axis=-1)[..., 0]


def compute_metrics(task, feats: features_lib.Features, outputs: dict) -> dict:
  """Metrics of all predictions (`outputs`: OUTPUTS[task.type] arrays, one row per feature)."""
  labels = list(task.labels)
  if task.type == "classification":
    logits, gold = outputs["logits"], np.asarray(feats.examples)
    preds = logits.argmax(-1)
    out = dict(loss=float(_nll(logits, gold).mean()), accuracy=metrics.accuracy(preds, gold))
    if "f1" in task.metrics:
      out["f1"] = metrics.binary_f1(preds, gold)
    if "matthews_corr" in task.metrics:
      out["matthews_corr"] = metrics.matthews_corr(preds, gold)
    return out
  if task.type == "regression":
    preds, gold = outputs["logits"][:, 0], np.asarray(feats.examples, np.float64)
    return dict(loss=float(((preds - gold) ** 2).mean()), pearson=metrics.pearson(preds, gold),
                spearman=metrics.spearman(preds, gold))
  if task.type == "tagging":
    logits, gold_ids = outputs["logits"], feats.arrays["labels"]
    keep = gold_ids >= 0
    loss = float(_nll(logits[keep], gold_ids[keep]).mean()) if keep.any() else 0.0
    pred_tags = features_lib.tag_predictions(feats, logits, labels)
    gold_tags = [[labels[t] for t in ex["tags"]] for ex in feats.examples]
    words = sum(len(t) for t in gold_tags)
    right = sum(p == g for ps, gs in zip(pred_tags, gold_tags) for p, g in zip(ps, gs))
    return dict(loss=loss, **metrics.entity_scores(gold_tags, pred_tags),
                accuracy=right / max(words, 1))
  answers = features_lib.qa_answers(feats, outputs["start_logits"], outputs["end_logits"],
                                    n_best=task.n_best, max_answer_len=task.max_answer_len)
  return metrics.squad_scores(answers, [ex["answers"] for ex in feats.examples])


# ---- config ------------------------------------------------------------------------------

def finetune_config(**task):
  """base_config('bert') (completion: 'gpt', seq2seq: 't5') with a `task` section and
  fine-tuning defaults.

  Keys added to the base: task.type/labels/fields/QA and generation settings/metrics,
  train.epochs (0: run train.steps instead) and train.warmup_ratio (0: use
  train.warmup_steps). Field names follow plmjax.finetune.data.task_fields.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top

  from plmjax.config import base_config  # pylint: disable=g-import-not-at-top

  kind = task.get("type", "classification")
  c = base_config(ARCHS.get(kind, "bert"))
  c.model.update(dropout_rate=0.1, attention_dropout_rate=0.1)
  values = dict(
      type="classification",
      # Label names (an integer label is an index into them).
      labels=("0", "1") if kind in ("classification", "tagging") else (),
      text_field="",  # record field names; "" = the source's own (data.task_fields): local
      text_b_field="",  # files text/text_b/label (tagging tokens/tags, qa question/context/
      label_field="",  # answers, completion prompt/completion, seq2seq source/target),
      # tfds: task.tfds_fields
      pairs=False,  # classification/regression: a second text per record (text_b)
      tfds_fields=dict(text="", text_b="", label=""),  # names in the tfds dataset ("": local)
      metrics=("accuracy",),  # classification extras: f1, matthews_corr
      doc_stride=128,  # qa: tokens between the starts of neighbouring windows
      max_query_len=64,  # qa: question tokens kept
      max_answer_len=30,  # qa: longest answer span, in tokens
      n_best=20,  # qa: start/end candidates per window
      max_new_tokens=64,  # completion/seq2seq: tokens generated per record (eval, predict)
  )
  values.update(task, tfds_fields=dict(values["tfds_fields"], **task.get("tfds_fields", {})))
  values["head"] = HEADS.get(values["type"], "sequence_classification")
  c.task = ml_collections.ConfigDict(values)
  c.train.epochs = 3
  c.train.warmup_ratio = 0.1
  c.train.update(batch_size=32, learning_rate=2e-5, weight_decay=0.01, log_every_steps=50)
  if kind == "completion":
    c.train.learning_rate = 5e-5
  if kind == "seq2seq":  # AdamW at a usual T5 fine-tuning rate; targets up to 64 tokens
    c.train.learning_rate = 3e-4
    c.data.max_target_len = 64
  c.checkpoint.update(every_steps=1000, keep=1)
  return c
