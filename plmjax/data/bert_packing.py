"""Packed BERT: several short [CLS] A [SEP] B [SEP] pairs in one row.

Chunks (bert_examples.py) are assigned to rows once, from their lengths: the
longest chunk left opens a row, then the shortest ones fill it while they fit
and the row has fewer than `max_pairs_per_row` pairs. A pair never grows beyond
its chunk (a random B is truncated to the chunk's length), so the assignment
holds in every epoch while A/B splits, NSP choices and masks change.

Extra keys over plain BERT: segment_ids (0 pad, 1..S), position_ids (restart at
each pair), cls_positions S, and per-pair nsp_labels / nsp_weights S.
"""

import array

import numpy as np

from plmjax.data import index_cache
from plmjax.data.bert_examples import BertExamples


def pack_rows(sizes: np.ndarray, capacity: int, max_items: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Groups items into rows of total size <= capacity; returns (row_offsets, items).

  The loop reads and writes compact arrays (8 bytes an item), not Python lists, so that
  millions of chunks stay a few hundred MB."""
  order = rng.permutation(len(sizes))  # so that rows mix documents
  order = order[np.argsort(-sizes[order], kind="stable")]
  size = array.array("q", sizes[order].astype(np.int64).tobytes())  # in `order`'s order
  items, offsets = array.array("q"), array.array("q", [0])
  i, j = 0, len(order) - 1
  while i <= j:
    items.append(i)
    space, count = capacity - size[i], 1
    i += 1
    while j >= i and count < max_items and size[j] <= space:
      items.append(j)
      space -= size[j]
      count += 1
      j -= 1
    offsets.append(len(items))
  return (np.frombuffer(offsets, np.int64).copy(),
          order[np.frombuffer(items, np.int64)].astype(np.int64))


class PackedBertExamples(BertExamples):
  """Map-style source of packed rows; `example(index, epoch)` as in BertExamples."""

  def __init__(self, corpus, tokenizer, *, max_pairs_per_row: int, **kwargs):
    super().__init__(corpus, tokenizer, **kwargs)
    self.max_pairs = max_pairs_per_row
    # A random-B chunk holds only A: its pair may fill the chunk's target length.
    length = np.where(self.chunks.is_random, self.chunks.target, self.chunks.end - self.chunks.start)
    self._budget = np.maximum(length, 2 if self.nsp else 1)
    sizes = self._budget + (3 if self.nsp else 2)
    key = dict(self.chunk_key, table="bert_rows", max_seq_len=self.max_seq_len,
               max_pairs_per_row=max_pairs_per_row)
    build = lambda: dict(zip(("row_offsets", "row_items"), pack_rows(
        sizes, self.max_seq_len, max_pairs_per_row, np.random.default_rng([self.seed, 0x5041434b]))))
    rows = index_cache.cached(self.cache_dir, key, build)
    self.row_offsets, self.row_items = rows["row_offsets"], rows["row_items"]

  def __len__(self) -> int:
    return len(self.row_offsets) - 1

  def example(self, index: int, epoch: int = 0) -> dict[str, np.ndarray]:
    rng = self.rng(index, epoch)
    items = self.row_items[self.row_offsets[index]:self.row_offsets[index + 1]]
    pairs = [self.make_pair(int(c), rng, int(self._budget[c])) for c in items]
    ids_L, types_L, pair_ids_L, cls_k = self.layout(pairs, self.max_seq_len)
    masked_L, positions_P, labels_P, weights_P = self.masker(ids_L, rng)
    n = int(np.count_nonzero(pair_ids_L))
    lengths = np.diff(np.append(cls_k, n))
    position_ids_L = np.zeros(self.max_seq_len, np.int32)
    position_ids_L[:n] = np.arange(n) - np.repeat(cls_k, lengths)
    s, k = self.max_pairs, len(pairs)
    cls_S = np.zeros(s, np.int32)
    nsp_S = np.zeros(s, np.int32)
    nsp_weights_S = np.zeros(s, np.float32)
    cls_S[:k] = cls_k
    nsp_S[:k] = [p[2] for p in pairs]
    nsp_weights_S[:k] = 1.0 if self.nsp else 0.0
    return dict(input_ids=masked_L, token_type_ids=types_L,
                attention_mask=(pair_ids_L > 0).astype(np.int32), segment_ids=pair_ids_L,
                position_ids=position_ids_L, masked_positions=positions_P,
                masked_labels=labels_P, masked_weights=weights_P, cls_positions=cls_S,
                nsp_labels=nsp_S, nsp_weights=nsp_weights_S)
