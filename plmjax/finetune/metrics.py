"""Task metrics, computed on host numpy arrays of all predictions.

GLUE: accuracy, binary F1 (positive class 1, as GLUE scores MRPC and QQP), Matthews
correlation (CoLA), Pearson and Spearman correlation (STS-B). CoNLL-2003:
entity-level precision/recall/F1 with seqeval's default (conlleval) chunking. SQuAD
v1.1: exact match and token F1 after the official answer normalisation, maximised
over the reference answers and reported in percent, as the official script does.
"""

import collections
import re
import string

import numpy as np


def accuracy(preds, labels) -> float:
  preds, labels = np.asarray(preds), np.asarray(labels)
  return float((preds == labels).mean()) if labels.size else 0.0


def binary_f1(preds, labels, positive: int = 1) -> float:
  preds, labels = np.asarray(preds) == positive, np.asarray(labels) == positive
  tp = float((preds & labels).sum())
  denom = float(preds.sum() + labels.sum())
  return 2 * tp / denom if denom else 0.0


def matthews_corr(preds, labels) -> float:
  """Multi-class Matthews correlation (Gorodkin's R_K; the binary MCC for two classes)."""
  preds, labels = np.asarray(preds), np.asarray(labels)
  classes = np.union1d(preds, labels)
  conf_KxK = np.zeros((classes.size, classes.size))
  np.add.at(conf_KxK, (np.searchsorted(classes, labels), np.searchsorted(classes, preds)), 1)
  n = conf_KxK.sum()
  true_K, pred_K = conf_KxK.sum(axis=1), conf_KxK.sum(axis=0)
  cov_tp = np.trace(conf_KxK) * n - true_K @ pred_K
  cov_pp = n * n - pred_K @ pred_K
  cov_tt = n * n - true_K @ true_K
  denom = np.sqrt(cov_pp * cov_tt)
  return float(cov_tp / denom) if denom else 0.0


def pearson(x, y) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  x, y = x - x.mean(), y - y.mean()
  denom = np.sqrt((x * x).sum() * (y * y).sum())
  return float((x * y).sum() / denom) if denom else 0.0


def _ranks(x) -> np.ndarray:
  """1-based ranks; tied values share their average rank."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="stable")
  ranks = np.empty(x.size)
  sorted_x = x[order]
  start = 0
  for end in range(1, x.size + 1):
    if end == x.size or sorted_x[end] != sorted_x[start]:
      ranks[order[start:end]] = (start + end + 1) / 2.0
      start = end
  return ranks


def spearman(x, y) -> float:
  return pearson(_ranks(x), _ranks(y))


# ---- entity-level F1 (seqeval default mode) ------------------------------------------

def _split_tag(tag: str) -> tuple[str, str]:
  if tag in ("O", ""):
    return "O", "_"
  prefix, _, kind = tag.partition("-")
  return prefix, kind or "_"


def _chunk_ends(prev: str, tag: str, prev_type: str, kind: str) -> bool:
  if prev in ("E", "S"):
    return True
  if prev in ("B", "I") and tag in ("B", "S", "O"):
    return True
  return prev != "O" and prev_type != kind


def _chunk_starts(prev: str, tag: str, prev_type: str, kind: str) -> bool:
  if tag in ("B", "S"):
    return True
  if prev in ("E", "S", "O") and tag in ("E", "I"):
    return True
  return tag != "O" and prev_type != kind


def get_entities(tags) -> list[tuple[str, int, int]]:
  """(type, first, last) chunks of an IOB1/IOB2/IOBES tag sequence, as seqeval finds them.

  An I- tag after O or after another type starts a chunk (IOB1 style).
  """
  chunks = []
  prev, prev_type, begin = "O", "_", 0
  for i, tag in enumerate(list(tags) + ["O"]):
    prefix, kind = _split_tag(tag)
    if _chunk_ends(prev, prefix, prev_type, kind) and prev != "O":
      chunks.append((prev_type, begin, i - 1))
    if _chunk_starts(prev, prefix, prev_type, kind):
      begin = i
    prev, prev_type = prefix, kind
  return chunks


def entity_scores(true_seqs, pred_seqs) -> dict:
  """Micro precision/recall/F1 over entities of all sentences (lists of tag strings)."""
  n_true = n_pred = n_correct = 0
  for true_tags, pred_tags in zip(true_seqs, pred_seqs, strict=True):
    true_set, pred_set = set(get_entities(true_tags)), set(get_entities(pred_tags))
    n_true += len(true_set)
    n_pred += len(pred_set)
    n_correct += len(true_set & pred_set)
  precision = n_correct / n_pred if n_pred else 0.0
  recall = n_correct / n_true if n_true else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return dict(precision=precision, recall=recall, f1=f1)


# ---- SQuAD v1.1 ------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
  """Lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact(prediction: str, truth: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(truth))


def squad_f1(prediction: str, truth: str) -> float:
  pred_tokens, true_tokens = normalize_answer(prediction).split(), normalize_answer(truth).split()
  same = sum((collections.Counter(pred_tokens) & collections.Counter(true_tokens)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred_tokens), same / len(true_tokens)
  return 2 * precision * recall / (precision + recall)


def squad_scores(predictions, references) -> dict:
  """predictions: answer strings; references: lists of acceptable answers (percent)."""
  em = f1 = 0.0
  for pred, truths in zip(predictions, references, strict=True):
    em += max(squad_exact(pred, t) for t in truths)
    f1 += max(squad_f1(pred, t) for t in truths)
  n = max(len(predictions), 1)
  return dict(exact_match=100.0 * em / n, f1=100.0 * f1 / n)
