"""Records -> fixed-length model inputs for each task type, and predictions -> answers.

Field names come from config.task: `text_field` (and `text_b_field` for pairs) hold the
text, `label_field` the label. Tagging reads a list of words from `text_field` (a string
is split on whitespace) and one tag per word from `label_field`; only the first sub-token
of a word carries its label. QA reads the question from `text_field`, the context from
`text_b_field` and the answers ({'text': [...], 'answer_start': [...]}, or answer strings)
from `label_field`; long contexts become several windows `doc_stride` tokens apart.
QA spans are sub-word spans: each context token keeps its (start, end) characters in the
context, the training target is the tokens that cover the answer's own characters, and a
predicted span is cut out of the context through those offsets (as Hugging Face's offset
mapping does), so "Greta" in "Greta's boat" and "1895" in "(1895-1943)" are answers.
"""

import dataclasses
import re

import numpy as np

from plmjax.errors import ConfigError, DataError
from plmjax.finetune.data import task_fields

IGNORE = -1  # tagging label of positions without a prediction target


class AnswerNotInContext(DataError):
  """A QA answer whose text is not at (or, without a start, anywhere in) its context."""


@dataclasses.dataclass
class Features:
  arrays: dict  # numpy arrays, leading dim = rows: model inputs, targets, `weights`
  examples: list  # per record: what the metrics need (gold labels, words, contexts)
  skipped: int = 0


def label_index(value, labels, where: str, class_names=None) -> int:
  """A label name (or its index) -> its index in config.task.labels."""
  if class_names is not None and isinstance(value, int) and 0 <= value < len(class_names):
    value = class_names[value]
  if isinstance(value, str):
    if value in labels:
      return labels.index(value)
    if value.strip().isdigit() and int(value) < len(labels):
      return int(value)
  elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
    return value
  raise DataError(f"{where}: label {value!r} is not one of config.task.labels "
                  f"({', '.join(labels)}) nor an index into them; fix the record or the labels")


class Encoder:
  """Tokenizer ids with [CLS]/[SEP] layout, truncation and a per-word cache."""

  def __init__(self, tokenizer, max_len: int):
    if tokenizer.cls_id is None or tokenizer.sep_id is None:
      raise DataError(f"tokenizer {tokenizer.path} has no [CLS]/[SEP]: fine-tuning heads are "
                      "for BERT models")
    self.tok, self.max_len = tokenizer, max_len
    self.cls, self.sep = tokenizer.cls_id, tokenizer.sep_id
    self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    self.unk = tokenizer.unk_id if tokenizer.unk_id is not None else self.pad
    self._words = {}

  def words(self, words: list[str]) -> list[list[int]]:
    new = sorted({w for w in words if w not in self._words})
    if new:
      for w, ids in zip(new, self.tok.encode_batch(new)):
        self._words[w] = list(ids) or [self.unk]  # a word never vanishes
    return [self._words[w] for w in words]

  def row(self, a: list[int], b: list[int] | None = None) -> dict:
    """[CLS] a [SEP] (b [SEP]), cut longest-first to max_len, padded."""
    a, b = list(a), list(b) if b is not None else None
    budget = self.max_len - (3 if b is not None else 2)
    while len(a) + len(b or ()) > budget:
      (a if b is None or len(a) >= len(b) else b).pop()
    ids = [self.cls] + a + [self.sep]
    types = [0] * len(ids)
    if b is not None:
      ids += b + [self.sep]
      types += [1] * (len(b) + 1)
    return self.pad_row(ids, types)

  def pad_row(self, ids, types) -> dict:
    n = len(ids)
    pad = self.max_len - n
    return dict(input_ids=np.array(ids + [self.pad] * pad, np.int32),
                token_type_ids=np.array(types + [0] * pad, np.int32),
                attention_mask=np.array([1] * n + [0] * pad, np.int32))


def _text(record, field: str, key: str) -> str:
  value = record.get(field, key)
  if not isinstance(value, str):
    raise DataError(f"{record.where}: field {field!r} should be text, got {value!r}")
  return value


def _stack(rows: list[dict]) -> dict:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def featurize(task, tokenizer, records, max_len: int, *, with_labels: bool = True) -> Features:
  """`task` is config.task; `records` a data.Records (or a list of Records)."""
  fn = {"classification": _sequence, "regression": _sequence, "tagging": _tagging,
        "qa": _qa}.get(task.type)
  if fn is None:
    raise ConfigError(f"config.task.type={task.type!r} is not allowed; use classification, "
                      "regression, tagging or qa")
  if not records:
    raise DataError("no records to featurise")
  task = task_fields(task, records)  # the field names these records use
  class_names = getattr(records, "class_names", {}).get(task.label_field)
  return fn(task, Encoder(tokenizer, max_len), records, with_labels, class_names)


def _sequence(task, enc, records, with_labels, class_names) -> Features:
  rows, examples = [], []
  labels = list(task.labels)
  for r in records:
    a = enc.tok.encode(_text(r, task.text_field, "config.task.text_field"))
    b = (enc.tok.encode(_text(r, task.text_b_field, "config.task.text_b_field"))
         if task.text_b_field else None)
    row = enc.row(a, b)
    row["weights"] = np.float32(1.0)
    if with_labels:
      value = r.get(task.label_field, "config.task.label_field")
      if task.type == "regression":
        try:
          row["labels"] = np.float32(float(value))
        except (TypeError, ValueError):
          raise DataError(f"{r.where}: label {value!r} is not a number (regression task)") from None
      else:
        row["labels"] = np.int32(label_index(value, labels, r.where, class_names))
      examples.append(row["labels"].item())
    else:
      examples.append(None)
    rows.append(row)
  return Features(_stack(rows), examples)


def _words_of(r, field: str) -> list[str]:
  value = r.get(field, "config.task.text_field")
  if isinstance(value, str):
    return value.split()
  if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
    raise DataError(f"{r.where}: field {field!r} should be a list of words or a text")
  return value


def _tagging(task, enc, records, with_labels, class_names) -> Features:
  labels = list(task.labels)
  rows, examples = [], []
  for r in records:
    words = _words_of(r, task.text_field)
    tags = []
    if with_labels:
      values = r.get(task.label_field, "config.task.label_field")
      if not isinstance(values, list) or len(values) != len(words):
        raise DataError(f"{r.where}: field {task.label_field!r} should hold one tag per word "
                        f"({len(words)} words)")
      tags = [label_index(v, labels, r.where, class_names) for v in values]
    ids, first = [], []  # first: position of each kept word's first sub-token
    for word_ids in enc.words(words):
      if 1 + len(ids) + len(word_ids) > enc.max_len - 1:
        break  # words past the length limit get no prediction (scored as 'O')
      first.append(1 + len(ids))
      ids.extend(word_ids)
    row = enc.pad_row([enc.cls] + ids + [enc.sep], [0] * (len(ids) + 2))
    label_ids = np.full(enc.max_len, IGNORE, np.int32)
    if with_labels:
      label_ids[first] = tags[:len(first)]
    row.update(labels=label_ids, weights=np.float32(1.0))
    rows.append(row)
    examples.append(dict(words=words, tags=tags, first=first))
  return Features(_stack(rows), examples)


def _answers(r, field: str, context: str) -> list[tuple[str, int]]:
  """(text, char start) of each reference answer; the start is checked or found."""
  value = r.get(field, "config.task.label_field")
  starts = None
  if isinstance(value, dict):
    texts, starts = value.get("text"), value.get("answer_start")
  else:
    texts = value
  texts = [texts] if isinstance(texts, str) else texts
  if starts is not None and not isinstance(starts, list):
    starts = [starts]
  if not texts or not all(isinstance(t, str) for t in texts):
    raise DataError(f"{r.where}: field {field!r} holds no answer text")
  out = []
  for i, text in enumerate(texts):
    start = int(starts[i]) if starts is not None and i < len(starts) else context.find(text)
    if start < 0 or context[start:start + len(text)] != text:
      raise AnswerNotInContext(f"{r.where}: answer {text!r} is not in its context"
                      + (f" at answer_start={start}" if starts is not None else ""))
    out.append((text, start))
  return out


def _windows(n: int, size: int, stride: int) -> list[tuple[int, int]]:
  out, start = [], 0
  while True:
    length = min(n - start, size)
    out.append((start, length))
    if start + length >= n:
      return out
    start += min(length, stride)


def _max_context(windows, n: int) -> np.ndarray:
  """Which window scores each context token best: the one where it has the most
  context on its shorter side (as the original BERT SQuAD code decides)."""
  best = np.full(n, -1)
  best_score = np.full(n, -np.inf)
  for w, (start, length) in enumerate(windows):
    pos = np.arange(start, start + length)
    score = np.minimum(pos - start, start + length - 1 - pos) + 0.01 * length
    better = score > best_score[pos]
    best[pos[better]], best_score[pos[better]] = w, score[better]
  return best


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
  """A token's characters without the whitespace it carries (sentencepiece's '▁')."""
  while start < end and text[start].isspace():
    start += 1
  while end > start and text[end - 1].isspace():
    end -= 1
  return start, end


def encode_with_offsets(tokenizer, texts: list[str]) -> list[tuple[list[int], np.ndarray]]:
  """Each text's ids (as tokenizer.encode gives them) and each token's (start, end)
  characters in the text, Nx2, whitespace left out (a token of only whitespace is empty)."""
  out = []
  for ids, pieces, offsets in tokenizer.encode_with_offsets(texts):
    text = texts[len(out)]
    # A lone '▁' may be the Metaspace pre-tokenizer's own (offsets of the next character).
    spans = [_strip(text, a, a if not piece.strip("\u2581\u0120") else b)
             for piece, (a, b) in zip(pieces, offsets)]
    out.append((ids, np.array(spans, np.int64).reshape(-1, 2)))
  return out


def _answer_tokens(offsets_Tx2, start: int, end: int):
  """First and last token that hold characters of context[start:end], or None."""
  hit = np.nonzero((offsets_Tx2[:, 0] < end) & (offsets_Tx2[:, 1] > start)
                   & (offsets_Tx2[:, 1] > offsets_Tx2[:, 0]))[0]
  return (int(hit[0]), int(hit[-1])) if hit.size else None


def _qa(task, enc, records, with_labels, class_names) -> Features:
  del class_names
  rows, examples, skipped = [], [], 0
  tfds = bool(records) and records[0].where.startswith("tfds:")
  encoded = {}  # context -> (ids, offsets): SQuAD asks several questions per context
  for r in records:
    question = _text(r, task.text_field, "config.task.text_field")
    context = _text(r, task.text_b_field, "config.task.text_b_field")
    spans = [m.span() for m in re.finditer(r"\S+", context)]
    if not spans:
      raise DataError(f"{r.where}: the context (field {task.text_b_field!r}) is empty")
    answers = []
    if with_labels:
      try:
        answers = _answers(r, task.label_field, context)
      except AnswerNotInContext:
        if not tfds:
          raise
        skipped += 1  # published sets hold a few misaligned answers: count, report, go on
        continue
    q = enc.tok.encode(question)[:task.max_query_len]
    if context not in encoded:
      encoded[context] = encode_with_offsets(enc.tok, [context])[0]
    ctx, offsets_Tx2 = encoded[context]
    # Whitespace word of each token (-1: a token of only whitespace).
    word_starts = np.array([a for a, _ in spans])
    tok_word = np.searchsorted(word_starts, offsets_Tx2[:, 0], side="right") - 1
    tok_word[offsets_Tx2[:, 1] <= offsets_Tx2[:, 0]] = -1
    target = None
    if answers:
      text, s = answers[0]
      target = _answer_tokens(offsets_Tx2, s, s + len(text))
      if target is None:
        raise AnswerNotInContext(f"{r.where}: answer {text!r} holds no context token")
    size = enc.max_len - len(q) - 3
    if size < 8:
      raise ConfigError(f"config.data.max_seq_len={enc.max_len} leaves {size} context tokens "
                        f"after a {len(q)}-token question; raise it or lower "
                        "config.task.max_query_len")
    windows = _windows(len(ctx), size, task.doc_stride)
    owner = _max_context(windows, len(ctx))
    example = dict(context=context, answers=[a for a, _ in answers], features=[],
                   token_word=[], max_context=[], offsets=[])
    off = len(q) + 2
    for w, (start, length) in enumerate(windows):
      row = enc.pad_row([enc.cls] + q + [enc.sep] + ctx[start:start + length] + [enc.sep],
                        [0] * off + [1] * (length + 1))
      token_word = np.full(enc.max_len, -1, np.int32)
      token_word[off:off + length] = tok_word[start:start + length]
      offsets_Lx2 = np.full((enc.max_len, 2), -1, np.int32)  # -1: not a context token
      offsets_Lx2[off:off + length] = offsets_Tx2[start:start + length]
      max_ctx = np.zeros(enc.max_len, np.bool_)
      max_ctx[off:off + length] = owner[start:start + length] == w
      s_pos = e_pos = 0  # [CLS] when the answer is not wholly inside this window
      if target is not None and target[0] >= start and target[1] < start + length:
        s_pos, e_pos = off + target[0] - start, off + target[1] - start
      row.update(start_positions=np.int32(s_pos), end_positions=np.int32(e_pos),
                 weights=np.float32(1.0))
      example["features"].append(len(rows))
      rows.append(row)
      example["token_word"].append(token_word)
      example["max_context"].append(max_ctx)
      example["offsets"].append(offsets_Lx2)
    examples.append(example)
  if not rows:
    raise DataError(f"no usable records ({skipped} skipped: answer not in context)")
  return Features(_stack(rows), examples, skipped)


def qa_answers(features: Features, start_NxL, end_NxL, *, n_best: int = 20,
               max_answer_len: int = 30) -> list[str]:
  """The best valid span of each example over all its windows, cut out of the context
  between its first token's start and its last token's end character."""
  out = []
  for ex in features.examples:
    best, best_score = None, -np.inf
    for f, offsets_Lx2, max_ctx in zip(ex["features"], ex["offsets"], ex["max_context"]):
      sl, el = start_NxL[f], end_NxL[f]
      valid = offsets_Lx2[:, 1] > offsets_Lx2[:, 0]  # context tokens with characters
      starts = np.argsort(-sl)[:n_best]
      ends = np.argsort(-el)[:n_best]
      for s in starts:
        if not valid[s] or not max_ctx[s]:
          continue
        for e in ends:
          if not valid[e] or e < s or e - s + 1 > max_answer_len:
            continue
          if sl[s] + el[e] > best_score:
            best, best_score = (offsets_Lx2[s, 0], offsets_Lx2[e, 1]), sl[s] + el[e]
    out.append("" if best is None else ex["context"][best[0]:best[1]])
  return out


def tag_predictions(features: Features, logits_NxLxC, labels) -> list[list[str]]:
  """Tag names per word (first sub-token's argmax); words cut off by max_seq_len get 'O'."""
  fallback = "O" if "O" in labels else labels[0]
  out = []
  for i, ex in enumerate(features.examples):
    pred = np.argmax(logits_NxLxC[i, ex["first"]], axis=-1) if ex["first"] else []
    tags = [labels[p] for p in pred]
    out.append(tags + [fallback] * (len(ex["words"]) - len(tags)))
  return out
