"""Where pretraining text comes from: local files, tfds datasets, or built-in text.

A *document* is a list of segments (strings): the paragraph lines of a text,
with long lines split at sentence ends (segments.py). Spec strings (config.data.train / eval):

  'corpus/*.txt'              documents separated by blank lines, one paragraph per line
  'corpus/*.jsonl'            one JSON object per line, the document in its `text` field
                              (.gz versions of both are read too)
  'tfds:NAME[/CONFIG]:SPLIT'  a prepared tfds dataset, read through tfds.data_source (no
                              TensorFlow); its `text` feature; data_dir=config.data.tfds_data_dir
  'builtin:python-docs[:eval]'  Python's own documentation (see python_docs.py)

Shards are disjoint and together cover the data. With at least two files per
process, process p of n reads only its own run of files (split by size);
otherwise it reads all and keeps documents i with i % n == p. tfds datasets are
read by record index, i % n == p.

A directory made by `plmjax data prepare` (prepared.py) is read by the pipeline,
not here: it is already tokenised.
"""

import glob
import gzip
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence

from plmjax.data import python_docs
from plmjax.data.segments import split_sentences, text_to_segments
from plmjax.errors import ConfigError, DataError


def read_documents(spec: str, *, process_index: int = 0, process_count: int = 1,
                   tfds_data_dir: str | None = None, key: str = "data spec"):
  """This process's documents of `spec` (a list, or a sized iterable for tfds).

  `key` names the config key the spec came from, for error messages.
  """
  docs = iter_documents(spec, process_index=process_index, process_count=process_count,
                        tfds_data_dir=tfds_data_dir, key=key)
  return docs if isinstance(docs, TfdsDocuments) else list(docs)


def iter_documents(spec: str, *, process_index: int = 0, process_count: int = 1,
                   tfds_data_dir: str | None = None, key: str = "data spec") -> Iterable[list[str]]:
  """Like read_documents, but files are read lazily, a document at a time."""
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} is not in [0, {process_count})")
  if not spec:
    raise ConfigError(f"{key} is empty; set it to a glob of .txt/.jsonl files, "
                      "tfds:NAME:SPLIT or builtin:python-docs")
  if spec.startswith("tfds:"):
    return TfdsDocuments(spec, process_index, process_count, tfds_data_dir, key)
  if spec.startswith("builtin:"):
    return python_docs.read(spec, key)[process_index::process_count]
  files = match_files(spec, key)
  owners = _file_owners(files, process_count)
  if owners is not None:  # enough files: each process opens only its own
    return iter_files([f for f, p in zip(files, owners) if p == process_index])
  return itertools.islice(iter_files(files), process_index, None, process_count)


def match_files(spec: str, key: str = "data spec") -> list[str]:
  """The files a glob spec names, sorted; an error if none."""
  if os.path.isfile(os.path.join(os.path.expanduser(spec), "manifest.json")):
    raise DataError(f"{key}={spec!r} is a prepared directory (`plmjax data prepare`): read it "
                    "through the pretraining pipeline, with config.data.tokenizer set to "
                    f"{os.path.join(spec, 'tokenizer')}, the tokenizer it was prepared with")
  files = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
  files = [f for f in files if os.path.isfile(f)]
  if not files:
    raise DataError(f"{key}={spec!r} matches no files")
  return files


def signature(spec: str, *, tfds_data_dir: str | None = None, key: str = "data spec") -> dict:
  """What `spec` reads now (its files' sizes and times): equal signatures, equal documents."""
  if spec.startswith("tfds:"):
    return dict(spec=spec, tfds_data_dir=tfds_data_dir or "")
  if spec.startswith("builtin:"):
    return dict(spec=spec)
  files = [os.path.abspath(f) for f in match_files(spec, key)]
  return dict(spec=spec, files=[[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files])


def _file_owners(files: Sequence[str], process_count: int) -> list[int] | None:
  """Contiguous runs of files of about equal total size per process, or None.

  None (shard by document instead) when there are fewer than 2 files per process
  or some process would get no file.
  """
  if process_count == 1 or len(files) < 2 * process_count:
    return None
  sizes = [os.path.getsize(f) for f in files]
  total, before, owners = sum(sizes) or 1, 0, []
  for size in sizes:
    owners.append(min(int((before + size / 2) / total * process_count), process_count - 1))
    before += size
  return owners if len(set(owners)) == process_count else None


def read_files(files: Sequence[str]) -> list[list[str]]:
  return list(iter_files(files))


def iter_files(files: Sequence[str]) -> Iterator[list[str]]:
  for path in files:
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(".jsonl"):
      docs = _jsonl_documents(path)
    elif name.endswith(".txt"):
      docs = _txt_documents(path)
    else:
      raise DataError(f"{path}: unsupported file type; use .txt (documents separated by blank "
                      "lines) or .jsonl (a `text` field per line)")
    empty = True
    for doc in docs:
      empty = False
      yield doc
    if empty:
      raise DataError(f"{path} holds no text")


def _open(path: str):
  if path.endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8")
  return open(path, encoding="utf-8")


def _txt_documents(path: str) -> Iterator[list[str]]:
  doc = []
  with _open(path) as f:
    for line in f:
      if line.strip():
        doc.extend(split_sentences(line))
      elif doc:
        yield doc
        doc = []
  if doc:
    yield doc


def json_lines(path: str) -> Iterator[tuple[int, object]]:
  """(line number, parsed value) for each non-blank line of a .jsonl(.gz) file."""
  with _open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        yield n, json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from e


def _jsonl_documents(path: str) -> Iterator[list[str]]:
  for n, record in json_lines(path):
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
      raise DataError(f"{path}:{n}: the line has no string field 'text'")
    doc = text_to_segments(record["text"])
    if doc:
      yield doc


_TFDS_SPEC = re.compile(r"(?P<name>[^:]+(?::[\d*]+\.[\d*]+\.[\d*]+)?):(?P<split>.+)")


def parse_tfds_spec(spec: str, key: str = "data spec") -> tuple[str, str]:
  """'tfds:wikipedia/20230601.en:train[:10%]' -> ('wikipedia/20230601.en', 'train[:10%]');
  a version stays with the name: 'tfds:c4/en:3.0.1:train' -> ('c4/en:3.0.1', 'train')."""
  match = _TFDS_SPEC.fullmatch(spec[len("tfds:"):])
  if not match:
    raise ConfigError(f"{key}={spec!r} is not of the form tfds:NAME[/CONFIG][:VERSION]:SPLIT "
                      "(e.g. tfds:wikipedia/20230601.en:train or tfds:c4/en:3.0.1:train)")
  return match["name"], match["split"]


def open_tfds(spec: str, data_dir: str | None = None, key: str = "data spec"):
  """`tfds.data_source` of a prepared dataset ('tfds:NAME[/CONFIG]:SPLIT'), read by index."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  name, split = parse_tfds_spec(spec, key)
  where = f"data_dir={data_dir!r}" if data_dir else "the default tfds data_dir"
  setting = "--tfds-data-dir" if key.startswith("--") else "config.data.tfds_data_dir"
  fix = f"prepare it with tfds or set {setting} to where it was prepared"
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(f"{key}={spec!r}: tfds dataset {name!r} not found in {where}; {fix}") from e
  except Exception as e:  # tfds raises assorted errors for unprepared data / bad splits
    first = str(e).strip().split("\n")[0]
    raise DataError(f"{key}={spec!r}: cannot read tfds dataset {name!r} split {split!r} from "
                    f"{where} ({first}); {fix}") from e


class TfdsDocuments:
  """This process's documents of a prepared tfds dataset, read lazily in batches."""

  def __init__(self, spec: str, process_index: int, process_count: int,
               data_dir: str | None, key: str = "data spec", batch: int = 256):
    self._source = open_tfds(spec, data_dir, key)
    features = list(self._source.dataset_info.features.keys())
    if "text" not in features:
      raise DataError(f"{key}={spec!r}: the tfds dataset has no 'text' feature "
                      f"(features: {', '.join(features)})")
    self._indices = range(process_index, len(self._source), process_count)
    self._batch = batch

  def __len__(self) -> int:
    return len(self._indices)

  def __iter__(self) -> Iterator[list[str]]:
    for start in range(0, len(self._indices), self._batch):
      records = self._source.__getitems__(list(self._indices[start:start + self._batch]))
      for record in records:
        text = record["text"]
        doc = text_to_segments(text.decode("utf-8") if isinstance(text, bytes) else str(text))
        if doc:
          yield doc
