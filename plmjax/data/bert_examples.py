"""BERT pretraining examples, made on the fly and deterministic in (seed, epoch, index).

Once per corpus, each document is cut into *chunks*: runs of whole segments of
about a target length (max_seq_len - 3; with probability short_seq_prob a random
shorter one, as google-research/bert does). A chunk less than MIN_FILL full cuts
the next segment at the target rather than end short; no token is dropped and no
chunk exceeds its target. Example i is made from chunk i; per epoch:

  A = the chunk up to a random segment boundary (a random token if it has none);
  B = the rest of the chunk (NSP label 0, "IsNext") with probability 1/2, else
      segments of another document from a random segment on (label 1);
  the pair is truncated like google-research/bert's truncate_seq_pair (the longer
  side loses a token from a random end until it fits), laid out as
  [CLS] A [SEP] B [SEP] with token types 0...0 1...1, and masked (masking.py).

With nsp=False a row is [CLS] chunk [SEP] (the chunk target is max_seq_len - 2).
`PackedBertExamples` puts several short pairs in one row (bert_packing.py).
"""

import dataclasses

import numpy as np

from plmjax.data.corpus import TokenizedCorpus
from plmjax.data.masking import Masker

# A chunk ends at a segment boundary once it holds this fraction of its target;
# below that, the next segment is cut to fill it (rows of wiki text are ~90% full).
MIN_FILL = 0.75


@dataclasses.dataclass(frozen=True)
class Chunks:
  """Chunk c is tokens[start[c]:end[c]] of document doc[c], cut for length target[c]."""
  start: np.ndarray
  end: np.ndarray
  doc: np.ndarray
  target: np.ndarray

  def __len__(self) -> int:
    return len(self.start)


def make_chunks(corpus: TokenizedCorpus, max_tokens: int, short_seq_prob: float,
                rng: np.random.Generator) -> Chunks:
  """Cuts every document into chunks of at most their target length (see module doc)."""
  seg_off = corpus.segment_offsets.tolist()
  doc_off = corpus.document_offsets.tolist()
  targets_drawn = _target_lengths(max_tokens, short_seq_prob, rng)
  new_target = lambda: next(targets_drawn)
  starts, ends, docs, targets = [], [], [], []

  def close(d, lo, hi, target):
    starts.append(lo)
    ends.append(hi)
    docs.append(d)
    targets.append(target)

  for d in range(corpus.num_documents):
    start = seg_off[doc_off[d]]
    target = new_target()
    for s in range(doc_off[d], doc_off[d + 1]):
      cur, seg_end = seg_off[s], seg_off[s + 1]
      while cur < seg_end:
        room = target - (cur - start)
        if seg_end - cur <= room:
          cur = seg_end
        elif cur - start >= MIN_FILL * target:
          close(d, start, cur, target)  # full enough: end the chunk at the segment boundary
          start, target = cur, new_target()
        else:
          cur += room  # cut the segment rather than leave the row mostly padding
          close(d, start, cur, target)
          start, target = cur, new_target()
      if cur - start >= target:
        close(d, start, cur, target)
        start, target = cur, new_target()
    if seg_off[doc_off[d + 1]] > start:
      close(d, start, seg_off[doc_off[d + 1]], target)
  as_array = lambda x: np.asarray(x, dtype=np.int64)
  return Chunks(as_array(starts), as_array(ends), as_array(docs), as_array(targets))


def _target_lengths(max_tokens: int, short_seq_prob: float, rng: np.random.Generator,
                    block: int = 4096):
  """Endless chunk targets: max_tokens, or w.p. short_seq_prob uniform in [2, max_tokens]."""
  while True:
    short = rng.random(block) < short_seq_prob
    lengths = rng.integers(min(2, max_tokens), max_tokens + 1, size=block)
    yield from np.where(short, lengths, max_tokens).tolist()


def truncation_counts(len_a: int, len_b: int, max_tokens: int) -> tuple[int, int]:
  """How many tokens truncate_seq_pair removes from A and from B.

  It removes from the longer side (B on ties) one token at a time; which side
  loses a token does not depend on the random draws, so the counts have a
  closed form. Only front-or-back is random: see `truncate_pair`.
  """
  excess = len_a + len_b - max_tokens
  if excess <= 0:
    return 0, 0
  if len_a > len_b:
    d = min(excess, len_a - len_b)  # A down to B's length, then B, A, B, ...
    excess -= d
    return d + excess // 2, (excess + 1) // 2
  d = min(excess, len_b - len_a + 1)  # B down to one below A, then A, B, A, ...
  excess -= d
  return (excess + 1) // 2, d + excess // 2


def truncate_pair(a: np.ndarray, b: np.ndarray, max_tokens: int, rng: np.random.Generator):
  """google-research/bert's truncate_seq_pair, in O(1): each removal is front or back w.p. 1/2."""
  ra, rb = truncation_counts(len(a), len(b), max_tokens)
  if ra:
    front = rng.binomial(ra, 0.5)
    a = a[front:len(a) - (ra - front)]
  if rb:
    front = rng.binomial(rb, 0.5)
    b = b[front:len(b) - (rb - front)]
  return a, b


class BertExamples:
  """Map-style source: `example(index, epoch)` -> dict of fixed-shape numpy arrays."""

  def __init__(self, corpus: TokenizedCorpus, tokenizer, *, max_seq_len: int,
               max_predictions_per_seq: int, mask_prob: float = 0.15,
               short_seq_prob: float = 0.1, whole_word_masking: bool = False, nsp: bool = True,
               seed: int = 0):
    self.corpus = corpus
    self.max_seq_len = max_seq_len
    self.nsp = nsp
    self.seed = seed
    self.pad_id, self.cls_id, self.sep_id = tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id
    self.masker = Masker.from_tokenizer(tokenizer, mask_prob=mask_prob,
                                        max_predictions=max_predictions_per_seq,
                                        whole_word=whole_word_masking)
    overhead = 3 if nsp else 2
    if max_seq_len < overhead + 2:
      raise ValueError(f"max_seq_len={max_seq_len} is too short for BERT examples")
    self.chunks = make_chunks(corpus, max_seq_len - overhead, short_seq_prob,
                              np.random.default_rng([seed, 0x43484e4b]))
    self._doc_starts = corpus.document_offsets  # segment index of each document's first segment

  def __len__(self) -> int:
    return len(self.chunks)

  def rng(self, index: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, epoch, index])

  def make_pair(self, c: int, rng: np.random.Generator, max_tokens: int):
    """(A, B, is_random) for chunk c, truncated to max_tokens; B is None without NSP."""
    tokens = self.corpus.tokens
    start, end = int(self.chunks.start[c]), int(self.chunks.end[c])
    if not self.nsp:
      return tokens[start:end][:max_tokens], None, False
    seg_off = self.corpus.segment_offsets
    inner = seg_off[np.searchsorted(seg_off, start, "right"):np.searchsorted(seg_off, end, "left")]
    if len(inner):
      a_end = int(inner[rng.integers(len(inner))])
    else:
      a_end = start + int(rng.integers(1, end - start)) if end - start >= 2 else end
    is_random = a_end == end or rng.random() < 0.5
    a = tokens[start:a_end]
    if is_random:
      b = self._random_span(int(self.chunks.doc[c]), int(self.chunks.target[c]) - len(a), rng)
    else:
      b = tokens[a_end:end]
    a, b = truncate_pair(a, b, max_tokens, rng)
    return a, b, is_random

  def _random_span(self, not_doc: int, min_tokens: int, rng) -> np.ndarray:
    """Whole segments of another document, from a random one on, until min_tokens."""
    n_docs = self.corpus.num_documents
    d = int(rng.integers(n_docs - 1)) if n_docs > 1 else 0
    if n_docs > 1 and d >= not_doc:
      d += 1  # any document but this one
    seg_lo, seg_hi = int(self._doc_starts[d]), int(self._doc_starts[d + 1])
    s = int(rng.integers(seg_lo, seg_hi))
    seg_off = self.corpus.segment_offsets
    begin = int(seg_off[s])
    ends = seg_off[s + 1:seg_hi + 1]
    end = int(ends[min(np.searchsorted(ends, begin + max(min_tokens, 1)), len(ends) - 1)])
    return self.corpus.tokens[begin:end]

  def layout(self, pairs, length: int):
    """[CLS] A [SEP] B [SEP] for each pair in a row: ids, token types, pair ids, positions."""
    parts, types, pair_ids, cls_pos = [], [], [], []
    cls, sep = np.array([self.cls_id], np.int32), np.array([self.sep_id], np.int32)
    n = 0
    for k, (a, b, _) in enumerate(pairs):
      first = np.concatenate([cls, a, sep])
      second = np.concatenate([b, sep]) if b is not None else np.zeros(0, np.int32)
      parts += [first, second]
      types += [np.zeros(len(first), np.int32), np.ones(len(second), np.int32)]
      pair_ids.append(np.full(len(first) + len(second), k + 1, np.int32))
      cls_pos.append(n)
      n += len(first) + len(second)
    ids_L = np.full(length, self.pad_id, np.int32)
    types_L = np.zeros(length, np.int32)
    pair_ids_L = np.zeros(length, np.int32)
    ids_L[:n] = np.concatenate(parts)
    types_L[:n] = np.concatenate(types)
    pair_ids_L[:n] = np.concatenate(pair_ids)
    return ids_L, types_L, pair_ids_L, np.asarray(cls_pos, np.int32)

  def example(self, index: int, epoch: int = 0) -> dict[str, np.ndarray]:
    rng = self.rng(index, epoch)
    pair = self.make_pair(index, rng, self.max_seq_len - (3 if self.nsp else 2))
    ids_L, types_L, pair_ids_L, _ = self.layout([pair], self.max_seq_len)
    masked_L, positions_P, labels_P, weights_P = self.masker(ids_L, rng)
    out = dict(input_ids=masked_L, token_type_ids=types_L,
               attention_mask=(pair_ids_L > 0).astype(np.int32), masked_positions=positions_P,
               masked_labels=labels_P, masked_weights=weights_P,
               nsp_labels=np.int32(pair[2]))
    if not self.nsp:
      out["nsp_weights"] = np.float32(0.0)
    return out
