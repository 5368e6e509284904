"""Labelled records from local files or tfds, and batch iterators over featurised arrays.

Specs (config.data.train / config.data.eval, `plmjax predict --input`):

  'path/train.jsonl'            one JSON object per line
  'path/train.tsv' / '.csv'     a header row naming the fields (tsv: no quoting, as GLUE's)
  'tfds:NAME[/CONFIG]:SPLIT'    a prepared tfds dataset (e.g. tfds:glue/sst2:validation),
                                read through tfds.data_source (no TensorFlow)

Every record remembers where it came from ('file:line' or 'tfds:...[index]') so that
bad values are reported with their place.

Field names, the one rule (`task_fields`): a name set in config.task.text_field /
text_b_field / label_field is read from every source; otherwise local files use the
documented names of the task type (LOCAL_FIELDS) and tfds datasets their own names, which
a config lists in config.task.tfds_fields (an empty entry there: the local name).
"""

import copy
import csv
import dataclasses
import os

import numpy as np

from plmjax.data.sources import json_lines, open_tfds
from plmjax.errors import ConfigError, DataError


@dataclasses.dataclass
class Record:
  fields: dict
  where: str  # 'file:line' or 'tfds:NAME:SPLIT[i]'

  def get(self, name: str, config_key: str):
    """The value of field `name` (dots reach into nested dicts, e.g. answers.text)."""
    value = self.fields
    for part in name.split("."):
      if not isinstance(value, dict) or part not in value:
        known = ", ".join(sorted(self.fields)) if isinstance(self.fields, dict) else "none"
        raise DataError(f"{self.where}: no field {name!r} (fields: {known}); set "
                        f"{config_key} to the field that holds it")
      value = value[part]
    return value


# Task type -> the (text, text_b, label) fields of records in local files.
LOCAL_FIELDS = {
    "classification": ("text", "text_b", "label"),
    "regression": ("text", "text_b", "label"),
    "tagging": ("tokens", "", "tags"),  # a list of words (or a text), one tag per word
    "qa": ("question", "context", "answers"),
    "completion": ("prompt", "", "completion"),
    "seq2seq": ("source", "", "target"),
}
SLOTS = ("text", "text_b", "label")


def task_fields(task, records):
  """A copy of `task` whose text_field, text_b_field and label_field are the names that
  `records` use (see the module docstring). text_b_field stays empty when the task reads
  one text: tagging, completion, seq2seq, and classification/regression without task.pairs (a set
  text_b_field implies pairs)."""
  local = LOCAL_FIELDS.get(task.type, LOCAL_FIELDS["classification"])
  from_tfds = bool(records) and records[0].where.startswith("tfds:")
  tfds_names = getattr(task, "tfds_fields", None) or {}
  names = []
  for slot, default in zip(SLOTS, local):
    name = getattr(task, f"{slot}_field", "") or ""
    if not name and from_tfds:
      name = tfds_names.get(slot, "") or ""
    names.append(name or default)
  pairs = task.type == "qa" or (
      task.type in ("classification", "regression")
      and (getattr(task, "pairs", False) or bool(getattr(task, "text_b_field", ""))))
  if not pairs:
    names[1] = ""
  resolved = copy.deepcopy(task)
  resolved.text_field, resolved.text_b_field, resolved.label_field = names
  return resolved


class Records(list):
  """A list of Records, plus the tfds ClassLabel names of label fields (if any)."""

  def __init__(self, items, spec: str, class_names: dict | None = None):
    super().__init__(items)
    self.spec = spec
    self.class_names = class_names or {}


def read_records(spec: str, *, tfds_data_dir: str = "", key: str = "config.data.train") -> Records:
  if not spec:
    raise ConfigError(f"{key} is empty; set it to a .jsonl/.tsv/.csv file or tfds:NAME:SPLIT")
  if spec.startswith("tfds:"):
    return _read_tfds(spec, tfds_data_dir, key)
  if not os.path.isfile(spec):
    raise DataError(f"{key}={spec!r}: no such file")
  if spec.endswith(".jsonl") or spec.endswith(".json"):
    records = list(_read_jsonl(spec))
  elif spec.endswith(".tsv") or spec.endswith(".csv"):
    records = list(_read_table(spec))
  else:
    raise DataError(f"{key}={spec!r}: unsupported file type; use .jsonl, .tsv or .csv")
  if not records:
    raise DataError(f"{spec} holds no records")
  return Records(records, spec)


def _read_jsonl(path: str):
  for n, fields in json_lines(path):
    if not isinstance(fields, dict):
      raise DataError(f"{path}:{n}: expected a JSON object, got {type(fields).__name__}")
    yield Record(fields, f"{path}:{n}")


def _read_table(path: str):
  tsv = path.endswith(".tsv")
  with open(path, encoding="utf-8", newline="") as f:
    reader = (csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv
              else csv.DictReader(f))
    try:
      for row in reader:
        if None in row:  # more cells than header names
          raise DataError(f"{path}:{reader.line_num}: {len(reader.fieldnames) + len(row[None])} "
                          f"cells but the header names {len(reader.fieldnames)} fields")
        yield Record(dict(row), f"{path}:{reader.line_num}")
    except csv.Error as e:  # e.g. a cell over csv's field size limit (131072 characters)
      raise DataError(f"{path}:{reader.line_num + 1}: {e}; write long texts as .jsonl "
                      "records instead") from None


def _plain(value):
  """tfds values (bytes, numpy arrays, nested dicts) as plain Python values."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, np.ndarray):
    return [_plain(v) for v in value.tolist()] if value.ndim else _plain(value.item())
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def _read_tfds(spec: str, data_dir: str, key: str) -> Records:
  source = open_tfds(spec, data_dir, key)
  class_names = {}
  for field, feature in source.dataset_info.features.items():
    names = getattr(feature, "names", None) or getattr(getattr(feature, "feature", None),
                                                       "names", None)
    if names:
      class_names[field] = list(names)
  records = []
  for start in range(0, len(source), 512):
    batch = source.__getitems__(list(range(start, min(start + 512, len(source)))))
    records.extend(Record(_plain(dict(r)), f"{spec}[{start + i}]") for i, r in enumerate(batch))
  return Records(records, spec, class_names)


# ---- iterators -------------------------------------------------------------------------

class BatchIterator:
  """Endless shuffled batches of featurised arrays, resumable from a JSON state.

  Global batch k holds rows k*B .. k*B+B-1 of an endless stream that visits the rows
  in a fresh permutation each epoch (seeded); process p takes its slice of each batch.
  """

  def __init__(self, arrays: dict, batch_size: int, *, seed: int = 0, process_index: int = 0,
               process_count: int = 1):
    self.arrays = arrays
    self.n = len(next(iter(arrays.values())))
    self.batch_size, self.seed = batch_size, seed
    self.local = batch_size // process_count
    self.offset = process_index * self.local
    self.batch = 0
    self._perm_epoch, self._perm = -1, None

  def get_state(self) -> dict:
    return {"batch": self.batch}

  def set_state(self, state: dict):
    self.batch = int(state["batch"])

  def __iter__(self):
    return self

  def _row(self, position: int) -> int:
    epoch, i = divmod(position, self.n)
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng((self.seed, epoch)).permutation(self.n)
      self._perm_epoch = epoch
    return int(self._perm[i])

  def __next__(self) -> dict:
    first = self.batch * self.batch_size + self.offset
    rows = [self._row(p) for p in range(first, first + self.local)]
    self.batch += 1
    return {k: v[rows] for k, v in self.arrays.items()}


def eval_batches(arrays: dict, batch_size: int, *, process_index: int = 0, process_count: int = 1):
  """All rows in order, in global batches padded with copies of row 0 at weight 0.

  Yields this process's slice of each global batch.
  """
  n = len(next(iter(arrays.values())))
  local = batch_size // process_count
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    valid = idx < n
    idx = np.where(valid, idx, 0)[process_index * local:(process_index + 1) * local]
    batch = {k: v[idx] for k, v in arrays.items()}
    batch["weights"] = batch["weights"] * valid[process_index * local:(process_index + 1) * local]
    yield batch
