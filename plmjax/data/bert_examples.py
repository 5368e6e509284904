"""BERT pretraining examples, made on the fly and deterministic in (seed, epoch, index).

Once per corpus (from the seed), each document is cut into *chunks*, as
google-research/bert's create_pretraining_data.py cuts its instances: runs of whole
segments of about a target length (max_seq_len - 3; with probability short_seq_prob a
random shorter one). Unlike there, no chunk exceeds its target: a chunk less than
MIN_FILL full cuts the next segment at the target rather than end short. With NSP, each
chunk's A/B split is drawn as it is cut:

  A = the chunk's segments up to a random inner segment boundary (all of it if the
      chunk is a single segment, or part of one);
  B = the rest of the chunk (NSP label 0, "IsNext") with probability 1/2, else (and
      always for a single-segment chunk) segments of another document (label 1). The
      segments a random B leaves out are put back: the next chunk starts with them.

Example i is made from chunk i; per epoch, the random B (its document and first
segment), the truncation (google-research/bert's truncate_seq_pair: the longer side
loses a token from a random end until the pair fits) and the masks (masking.py) are
drawn again; [CLS] A [SEP] B [SEP] with token types 0...0 1...1.

With nsp=False a row is [CLS] chunk [SEP] (the chunk target is max_seq_len - 2).
`PackedBertExamples` puts several short pairs in one row (bert_packing.py).
"""

import dataclasses

import numpy as np
import tqdm

from plmjax.data import index_cache
from plmjax.data.corpus import TokenizedCorpus
from plmjax.data.masking import Masker

# A chunk ends at a segment boundary once it holds this fraction of its target;
# below that, the next segment is cut to fill it (rows of wiki text are ~90% full).
MIN_FILL = 0.75


@dataclasses.dataclass(frozen=True)
class Chunks:
  """Chunk c is tokens[start[c]:end[c]] of document doc[c], cut for length target[c].

  NSP: A is tokens[start[c]:a_end[c]]; B is tokens[a_end[c]:end[c]] unless is_random[c]
  (then a_end[c] == end[c] and B comes from another document). Without NSP a_end == end.
  """
  start: np.ndarray
  end: np.ndarray
  doc: np.ndarray
  target: np.ndarray
  a_end: np.ndarray
  is_random: np.ndarray

  def __len__(self) -> int:
    return len(self.start)


COLUMN_DTYPES = (np.int64, np.int64, np.int32, np.int32, np.int64, np.bool_)  # as in Chunks


def make_chunks(corpus: TokenizedCorpus, max_tokens: int, short_seq_prob: float,
                rng: np.random.Generator, nsp_rng: np.random.Generator | None = None,
                block_documents: int = 4096) -> Chunks:
  """Cuts every document into chunks of at most their target length (see module doc);
  with `nsp_rng`, draws each chunk's A/B split and puts back what a random B leaves out.

  Documents are walked a block at a time, so that only one block's offsets are Python
  lists; a progress bar shows after 3 s (millions of segments)."""
  next_target = _target_lengths(max_tokens, short_seq_prob, rng).__next__
  next_draws = _uniform_pairs(nsp_rng).__next__ if nsp_rng is not None else None
  n_docs, blocks = corpus.num_documents, []
  bar = tqdm.tqdm(total=n_docs, desc="cutting BERT chunks", unit="doc", delay=3, leave=False)
  for d0 in range(0, n_docs, block_documents):
    d1 = min(d0 + block_documents, n_docs)
    s0 = int(corpus.document_offsets[d0])
    doc_off = (corpus.document_offsets[d0:d1 + 1] - s0).tolist()  # local segment indices
    seg_off = corpus.segment_offsets[s0:s0 + doc_off[-1] + 1].tolist()
    columns = starts, ends, docs, targets, a_ends, randoms = [], [], [], [], [], []
    for d in range(d1 - d0):
      s, s_last = doc_off[d], doc_off[d + 1]
      start, doc_end = seg_off[s], seg_off[s_last]
      while start < doc_end:
        target = next_target()
        end, s_next = _chunk_end(seg_off, start, s, s_last, target)
        a_end, is_random = end, False
        if next_draws is not None:
          u_split, u_random = next_draws()
          inner = s_next - s - (seg_off[s_next] == end)  # segment starts inside (start, end)
          if inner == 0:
            is_random = True  # a single segment: B can only come from elsewhere
          else:
            k = s + 1 + int(u_split * inner)
            a_end, is_random = seg_off[k], u_random < 0.5
            if is_random:  # the segments after A go back for the next chunk
              end, s_next = a_end, k
        starts.append(start)
        ends.append(end)
        docs.append(d0 + d)
        targets.append(target)
        a_ends.append(a_end)
        randoms.append(is_random)
        start, s = end, s_next
    blocks.append([np.asarray(c, dtype=t) for c, t in zip(columns, COLUMN_DTYPES)])
    bar.update(d1 - d0)
  bar.close()
  if not blocks:
    return Chunks(*(np.zeros(0, t) for t in COLUMN_DTYPES))
  return Chunks(*(np.concatenate(column) for column in zip(*blocks)))


def _chunk_end(seg_off: list, start: int, s: int, s_last: int, target: int) -> tuple[int, int]:
  """(end, s): where the chunk that starts at token `start`, in segment s, ends, and the
  segment holding its end (s_last at the document's end). Whole segments while they fit;
  then end at the boundary if MIN_FILL full, else cut the next segment at the target."""
  cur = start
  while s < s_last:
    seg_end = seg_off[s + 1]
    room = target - (cur - start)
    if seg_end - cur <= room:
      cur, s = seg_end, s + 1
      if cur - start >= target:
        break
    elif cur - start >= MIN_FILL * target:
      break
    else:
      cur += room
      break
  return cur, s


def _uniform_pairs(rng: np.random.Generator, block: int = 4096):
  """Endless pairs of uniform [0, 1) draws (drawn a block at a time: one per chunk)."""
  while True:
    yield from rng.random((block, 2)).tolist()


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
               seed: int = 0, cache_dir: str | None = None):
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
    self.cache_dir = cache_dir
    # What the chunks depend on (index_cache keeps them under cache_dir for the next start).
    self.chunk_key = dict(table="bert_chunks", max_tokens=max_seq_len - overhead,
                          short_seq_prob=short_seq_prob, min_fill=MIN_FILL, nsp=nsp, seed=seed,
                          offsets=index_cache.offsets_digest(corpus) if cache_dir else None)
    build = lambda: dataclasses.asdict(make_chunks(
        corpus, max_seq_len - overhead, short_seq_prob, np.random.default_rng([seed, 0x43484e4b]),
        np.random.default_rng([seed, 0x4e5350]) if nsp else None))
    self.chunks = Chunks(**index_cache.cached(cache_dir, self.chunk_key, build))
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
    a_end, is_random = int(self.chunks.a_end[c]), bool(self.chunks.is_random[c])
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
