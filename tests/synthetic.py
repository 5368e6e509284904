"""Synthetic batches for trainer tests: deterministic in (seed, index), resumable."""

import numpy as np


class SyntheticBert:
  """BERT pretraining batches of random tokens with a learnable MLM signal
  (the label of a masked position is the token just before it)."""

  def __init__(self, batch_size, seq_len=16, vocab=64, preds=4, seed=0):
    self.b, self.l, self.v, self.p, self.seed = batch_size, seq_len, vocab, preds, seed
    self.index = 0

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = int(state["index"])

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng((self.seed, self.index))
    self.index += 1
    ids = rng.integers(5, self.v, (self.b, self.l)).astype(np.int32)
    ids[:, 0] = 2
    pos = np.sort(rng.choice(np.arange(2, self.l), (self.b, self.p)), axis=1).astype(np.int32)
    labels = np.take_along_axis(ids, pos - 1, axis=1)
    ids_masked = ids.copy()
    np.put_along_axis(ids_masked, pos, 4, axis=1)
    mask = np.ones((self.b, self.l), np.int32)
    mask[:, -2:] = 0
    return dict(input_ids=ids_masked, token_type_ids=np.zeros_like(ids),
                attention_mask=mask, masked_positions=pos, masked_labels=labels.astype(np.int32),
                masked_weights=np.ones((self.b, self.p), np.float32),
                nsp_labels=rng.integers(0, 2, (self.b,)).astype(np.int32))
