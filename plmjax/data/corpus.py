"""A tokenised corpus as flat arrays, so that 100 MB of text stays a few hundred MB.

  tokens            int32 [T]     all token ids, document after document
  segment_offsets   int64 [S+1]   segment s is tokens[segment_offsets[s]:segment_offsets[s+1]]
  document_offsets  int64 [D+1]   document d is segments document_offsets[d]..[d+1]

Empty segments and documents are dropped. The example builders only take `len()` and
contiguous slices of `tokens`, so a prepared directory (prepared.py) gives them a lazy
`tokens` that reads a document's record when a slice touches it; the offsets stay arrays.
"""

import dataclasses
from collections.abc import Iterable

import numpy as np
import tqdm

from plmjax.errors import DataError


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
  tokens: np.ndarray  # or prepared.PreparedTokens
  segment_offsets: np.ndarray
  document_offsets: np.ndarray

  @property
  def num_documents(self) -> int:
    return len(self.document_offsets) - 1

  @property
  def num_segments(self) -> int:
    return len(self.segment_offsets) - 1

  @property
  def num_tokens(self) -> int:
    return len(self.tokens)

  def document_token_range(self, d: int) -> tuple[int, int]:
    return (int(self.segment_offsets[self.document_offsets[d]]),
            int(self.segment_offsets[self.document_offsets[d + 1]]))

  def document_starts(self) -> np.ndarray:
    """Token offset of each document's first token, plus the end: int64 [D+1]."""
    return self.segment_offsets[self.document_offsets]


def tokenize_documents(documents: Iterable[list[str]], tokenizer, *, name: str = "corpus",
                       batch_docs: int = 512) -> TokenizedCorpus:
  """Tokenises every segment once; shows a progress bar if it takes more than 3 s."""
  tokens, seg_lengths, doc_lengths = [], [], []
  total = len(documents) if hasattr(documents, "__len__") else None
  bar = tqdm.tqdm(total=total, desc=f"tokenizing {name}", unit="doc", delay=3, leave=False)
  batch = []

  def flush():
    texts = [s for doc in batch for s in doc]
    ids = tokenizer.encode_batch(texts) if texts else []
    k, flat = 0, []
    for doc in batch:
      kept = 0
      for seg in ids[k:k + len(doc)]:
        if seg:
          flat.extend(seg)
          seg_lengths.append(len(seg))
          kept += 1
      k += len(doc)
      if kept:
        doc_lengths.append(kept)
    tokens.append(np.array(flat, dtype=np.int32))
    bar.update(len(batch))
    batch.clear()

  for doc in documents:
    batch.append(doc)
    if len(batch) >= batch_docs:
      flush()
  flush()
  bar.close()
  if not seg_lengths:
    raise DataError(f"{name} has no tokens after tokenisation")
  return TokenizedCorpus(
      tokens=np.concatenate(tokens),
      segment_offsets=np.concatenate([[0], np.cumsum(seg_lengths, dtype=np.int64)]),
      document_offsets=np.concatenate([[0], np.cumsum(doc_lengths, dtype=np.int64)]))
