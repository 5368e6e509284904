"""A corpus tokenised once by `plmjax data prepare`, read lazily from ArrayRecord shards.

  DIR/manifest.json             written last: format, version, plan (source, tokenizer
                                fingerprint and vocab size, shard size), per-shard counts
  DIR/shard-00000.array_record  the documents' token ids, in records of PIECE_TOKENS
                                (group_size 1, for random access)
  DIR/shard-00000.index.npz     segments per document and segment lengths: offsets only
  DIR/tokenizer/                a copy of the tokenizer it was prepared with

A document of T tokens is ceil(T / PIECE_TOKENS) records in a row: its token ids,
little-endian, in the manifest's token_dtype (uint16 when the vocabulary fits, else
int32), cut every PIECE_TOKENS tokens, so that a slice of a book reads a few pieces, not
the book. Its segment (sentence, paragraph) boundaries are in the index.

`open_corpus` gives a TokenizedCorpus whose `tokens` is a lazy `PreparedTokens`:
slicing it reads only the records the slice touches, through grain's
ArrayRecordDataSource. Process p of n owns documents i with i % n == p and reads
no other record. Only the offsets live in memory.
"""

import collections
import hashlib
import json
import os
import threading

import numpy as np

from plmjax.data.corpus import TokenizedCorpus
from plmjax.data.gpt_examples import GptExamples
from plmjax.errors import DataError

FORMAT, VERSION = "plmjax-prepared", 1
MANIFEST = "manifest.json"
PLAN = "prepare.json"  # an unfinished prepare: its plan, until the manifest replaces it
PIECE_TOKENS = 4096


def shard_name(k: int) -> str:
  return f"shard-{k:05d}.array_record"


def index_name(k: int) -> str:
  return f"shard-{k:05d}.index.npz"


def fingerprint(tokenizer) -> str:
  """sha256 of the bytes that define the tokenizer (its file; a vocab.txt's config too)."""
  h = hashlib.sha256()
  with open(tokenizer.path, "rb") as f:
    h.update(f.read())
  config = os.path.join(os.path.dirname(tokenizer.path), "tokenizer_config.json")
  if tokenizer.path.endswith(".txt") and os.path.isfile(config):
    with open(config, "rb") as f:
      h.update(f.read())
  return "sha256:" + h.hexdigest()


def token_dtype(vocab_size: int) -> str:
  return "uint16" if vocab_size <= 1 << 16 else "int32"


def pieces(tokens: np.ndarray, dtype: str, piece_tokens: int) -> list[bytes]:
  """One document's records: its ids cut every piece_tokens tokens."""
  data = np.asarray(tokens).astype(np.dtype(dtype).newbyteorder("<"))
  return [data[i:i + piece_tokens].tobytes() for i in range(0, len(data), piece_tokens)]


def is_prepared(spec: str) -> bool:
  return bool(spec) and os.path.isfile(os.path.join(os.path.expanduser(spec), MANIFEST))


def is_unfinished(spec: str) -> bool:
  return bool(spec) and os.path.isfile(os.path.join(os.path.expanduser(spec), PLAN))


def read_manifest(directory: str, key: str = "data spec") -> dict:
  path = os.path.join(os.path.expanduser(directory), MANIFEST)
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f"{key}={directory!r}: cannot read {path} ({e}); prepare the corpus "
                    "again with `plmjax data prepare`") from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise DataError(f"{key}={directory!r}: {path} is not a plmjax prepared-corpus manifest")
  if manifest.get("version") != VERSION:
    raise DataError(f"{key}={directory!r} was prepared in format version "
                    f"{manifest.get('version')}; this plmjax reads version {VERSION}: prepare "
                    "it again with `plmjax data prepare`")
  return manifest


def check_manifest(manifest: dict, directory: str, tokenizer, model_vocab_size: int,
                   key: str = "data spec"):
  """The prepared ids must be this run's tokenizer's ids, and fit the embedding table."""
  tok = manifest["plan"]["tokenizer"]
  if tok["vocab_size"] > model_vocab_size:
    raise DataError(f"{key}={directory!r} was prepared with a {tok['vocab_size']}-token "
                    f"vocabulary but config.model.vocab_size={model_vocab_size}; set "
                    f"config.model.vocab_size={tok['vocab_size']} or prepare the corpus with "
                    "the run's tokenizer")
  if tok["fingerprint"] != fingerprint(tokenizer):
    raise DataError(f"{key}={directory!r} was prepared with another tokenizer "
                    f"({tok['fingerprint'][:19]}..., from {tok['path']}) than this run's "
                    f"{tokenizer.path}: set config.data.tokenizer="
                    f"{os.path.join(directory, 'tokenizer')} or prepare the corpus again with "
                    f"--tokenizer {tokenizer.path}")


def open_corpus(directory: str, tokenizer, *, model_vocab_size: int, process_index: int = 0,
                process_count: int = 1, key: str = "data spec") -> TokenizedCorpus:
  """This process's documents of a prepared directory, tokens read on demand."""
  directory = os.path.expanduser(directory)
  manifest = read_manifest(directory, key)
  check_manifest(manifest, directory, tokenizer, model_vocab_size, key)
  piece = manifest["piece_tokens"]
  paths, seg_lengths, doc_segments, doc_records = [], [], [], []
  first_doc = first_record = 0  # global indices of the shard's first document and record
  for k, shard in enumerate(manifest["shards"]):
    n_docs = shard["documents"]
    if n_docs:
      paths.append(f"{os.path.join(directory, shard_name(k))}[0:{shard['records']}]")
      mine = np.arange(n_docs)[(first_doc + np.arange(n_docs)) % process_count == process_index]
      if len(mine):
        with np.load(os.path.join(directory, index_name(k))) as index:
          per_doc = index["doc_segments"].astype(np.int64)
          lengths = index["segment_lengths"].astype(np.int64)
        seg_start = np.concatenate([[0], np.cumsum(per_doc)])
        tok_start = np.concatenate([[0], np.cumsum(lengths)])[seg_start]
        records = -(-np.diff(tok_start) // piece)  # per document
        rec_start = first_record + np.concatenate([[0], np.cumsum(records)[:-1]])
        seg_lengths.append(lengths[_ranges(seg_start[mine], seg_start[mine + 1])])
        doc_segments.append(per_doc[mine])
        doc_records.append(rec_start[mine])
    first_doc += n_docs
    first_record += shard["records"]
  if not doc_segments:
    where = f" for process {process_index} of {process_count}" if process_count > 1 else ""
    raise DataError(f"{key}={directory!r} holds no documents{where}")
  seg_lengths, doc_segments = np.concatenate(seg_lengths), np.concatenate(doc_segments)
  segment_offsets = np.concatenate([[0], np.cumsum(seg_lengths)])
  document_offsets = np.concatenate([[0], np.cumsum(doc_segments)])
  tokens = PreparedTokens(paths, segment_offsets[document_offsets], np.concatenate(doc_records),
                          manifest["token_dtype"], piece)
  return TokenizedCorpus(tokens, segment_offsets, document_offsets)


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
  """Concatenation of arange(s, e) for each pair, vectorised."""
  lengths = ends - starts
  offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
  return np.arange(lengths.sum()) + offsets


class PreparedTokens:
  """The flat token array of this process's documents, read lazily: `len()` and
  contiguous slices (what the example builders use); a few decoded records are cached."""

  def __init__(self, paths: list[str], doc_starts: np.ndarray, doc_records: np.ndarray,
               dtype: str, piece_tokens: int, cache_records: int = 32):
    # grain brings jax: imported here, not in `data prepare`'s worker processes.
    import grain  # pylint: disable=g-import-not-at-top

    self._source = grain.sources.ArrayRecordDataSource(paths)
    self._starts = doc_starts  # int64 [D+1]: token offset of each local document
    self._records = doc_records  # int64 [D]: global key of each local document's first record
    self._dtype = np.dtype(dtype).newbyteorder("<")
    self._piece = piece_tokens
    self._cache_records = cache_records
    self._init_cache()

  def _init_cache(self):
    self._cache = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getstate__(self):  # for grain's worker processes
    state = self.__dict__.copy()
    del state["_cache"], state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _record(self, key: int) -> np.ndarray:
    with self._lock:
      ids = self._cache.get(key)
      if ids is None:
        ids = np.frombuffer(self._source[key], self._dtype).astype(np.int32)
        self._cache[key] = ids
        if len(self._cache) > self._cache_records:
          self._cache.popitem(last=False)
      return ids

  def _document_slice(self, d: int, lo: int, hi: int) -> np.ndarray:
    """Tokens lo:hi of local document d, from the records that hold them."""
    p = self._piece
    key = int(self._records[d])
    parts = [self._record(key + j) for j in range(lo // p, (hi - 1) // p + 1)]
    ids = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return ids[lo - (lo // p) * p:hi - (lo // p) * p]

  def __getitem__(self, index):
    if not isinstance(index, slice) or index.step not in (None, 1):
      raise TypeError("PreparedTokens supports contiguous slices only")
    start, stop, _ = index.indices(len(self))
    if stop <= start:
      return np.zeros(0, np.int32)
    first = int(np.searchsorted(self._starts, start, "right")) - 1
    last = int(np.searchsorted(self._starts, stop, "left"))
    parts = []
    for d in range(first, last):
      begin, end = int(self._starts[d]), int(self._starts[d + 1])
      parts.append(self._document_slice(d, max(start, begin) - begin, min(stop, end) - begin))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class EotStream:
  """doc_1 EOT doc_2 EOT ... of a corpus as a lazily sliced sequence (GptExamples' stream)."""

  def __init__(self, corpus: TokenizedCorpus, eos_id: int):
    self._tokens, self._eos = corpus.tokens, eos_id
    self._doc_tokens = corpus.document_starts()
    self.doc_starts = self._doc_tokens[:-1] + np.arange(corpus.num_documents)
    self._len = int(self._doc_tokens[-1]) + corpus.num_documents

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: slice) -> np.ndarray:
    start, stop, _ = index.indices(self._len)
    if stop <= start:
      return np.zeros(0, np.int32)
    parts = []
    first = int(np.searchsorted(self.doc_starts, start, "right")) - 1
    for d in range(first, len(self.doc_starts)):
      begin = int(self.doc_starts[d])
      if begin >= stop:
        break
      first_token = int(self._doc_tokens[d])
      n = int(self._doc_tokens[d + 1]) - first_token  # the document's EOT is at begin + n
      lo, hi = max(start, begin) - begin, min(stop, begin + n + 1) - begin
      parts.append(self._tokens[first_token + lo:first_token + min(hi, n)])
      if hi == n + 1:
        parts.append(np.array([self._eos], np.int32))
    return np.concatenate(parts).astype(np.int32)


class StreamGptExamples(GptExamples):
  """GptExamples over a lazy corpus: the stream is sliced on demand, never built."""

  def __init__(self, corpus: TokenizedCorpus, tokenizer, *, max_seq_len: int,
               packing: bool = False):  # pylint: disable=super-init-not-called
    self.max_seq_len = max_seq_len
    self.packing = packing
    self.eos_id = tokenizer.eos_id
    self.stream = EotStream(corpus, self.eos_id)
    self.doc_starts = self.stream.doc_starts
