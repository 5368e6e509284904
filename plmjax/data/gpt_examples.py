"""GPT examples: documents joined by <|endoftext|> into one stream, cut into rows.

The stream is doc_1 EOT doc_2 EOT ... doc_n EOT. Row i reads the inputs
stream[i*L:(i+1)*L] and the targets one token later, so every token is an input
exactly once (the last EOT is only a target); the final row is padded with EOT
and loss weight 0. Every real position has loss weight 1, including the
prediction of a document's first token from the previous EOT, as GPT-2 trains.

With packing, segment_ids (1, 2, ... per document in the row, 0 at padding) and
position_ids (restarting at each document, and at the row start) let attention
stay within a document; a document's EOT belongs to that document.
"""

import numpy as np

from plmjax.data.corpus import TokenizedCorpus


class GptExamples:
  """Map-style source: `example(index, epoch)` -> dict of fixed-shape numpy arrays."""

  def __init__(self, corpus: TokenizedCorpus, tokenizer, *, max_seq_len: int,
               packing: bool = False):
    self.max_seq_len = max_seq_len
    self.packing = packing
    self.eos_id = tokenizer.eos_id
    ends = corpus.document_starts()[1:]
    self.stream = np.insert(corpus.tokens, ends, self.eos_id).astype(np.int32)
    # Offset of each document's first token in the stream (one EOT more per earlier document).
    self.doc_starts = corpus.document_starts()[:-1] + np.arange(corpus.num_documents)

  def __len__(self) -> int:
    return -(-(len(self.stream) - 1) // self.max_seq_len)

  def example(self, index: int, epoch: int = 0) -> dict[str, np.ndarray]:
    del epoch  # rows are fixed; the pipeline shuffles their order per epoch
    length = self.max_seq_len
    s = index * length
    e = min(s + length, len(self.stream) - 1)
    n = e - s
    inputs_L = np.full(length, self.eos_id, np.int32)
    targets_L = np.full(length, self.eos_id, np.int32)
    weights_L = np.zeros(length, np.float32)
    inputs_L[:n] = self.stream[s:e]
    targets_L[:n] = self.stream[s + 1:e + 1]
    weights_L[:n] = 1.0
    out = dict(input_ids=inputs_L, targets=targets_L, loss_weights=weights_L)
    if self.packing:
      pos = np.arange(s, e)
      doc = np.searchsorted(self.doc_starts, pos, side="right") - 1
      segment_L = np.zeros(length, np.int32)
      position_L = np.zeros(length, np.int32)
      segment_L[:n] = doc - doc[0] + 1
      position_L[:n] = pos - np.maximum(self.doc_starts[doc], s)
      out.update(segment_ids=segment_L, position_ids=position_L)
    return out
