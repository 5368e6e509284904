"""BERT's masked-LM corruption of one row (google-research/bert, create_masked_lm_predictions).

Of the row's non-special tokens, mask_prob are chosen for prediction (rounded
stochastically, so the rate is unbiased even for short rows; at least one, at
most max_predictions). Each chosen token becomes [MASK] with p=0.8, a random
non-special token with p=0.1, and stays itself with p=0.1. With whole-word
masking, words (a start piece and its continuation pieces) are chosen whole.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Masker:
  mask_prob: float
  max_predictions: int
  mask_id: int
  special: np.ndarray  # bool [V]: never chosen (specials and padding)
  replacements: np.ndarray  # int32: the ids a "random token" is drawn from
  word_start: np.ndarray | None = None  # bool [V], for whole-word masking

  @classmethod
  def from_tokenizer(cls, tokenizer, *, mask_prob: float, max_predictions: int,
                     whole_word: bool = False) -> "Masker":
    special = np.zeros(tokenizer.vocab_size, dtype=np.bool_)
    special[list(tokenizer.special_ids)] = True
    word_start = None
    if whole_word:
      word_start = tokenizer.is_word_start(np.arange(tokenizer.vocab_size))
    return cls(mask_prob=mask_prob, max_predictions=max_predictions, mask_id=tokenizer.mask_id,
               special=special, replacements=np.flatnonzero(~special).astype(np.int32),
               word_start=word_start)

  def __call__(self, ids_L: np.ndarray, rng: np.random.Generator):
    """Returns (masked ids_L, positions_P, labels_P, weights_P); P = max_predictions."""
    cand = np.flatnonzero(~self.special[ids_L])
    k = min(int(len(cand) * self.mask_prob + rng.random()), self.max_predictions, len(cand))
    if len(cand):
      k = max(k, 1)
    if self.word_start is None:
      positions = np.sort(rng.permutation(cand)[:k])  # permutation: 3x faster than choice
    else:
      positions = self._whole_words(ids_L, cand, k, rng)
    k = len(positions)
    labels = ids_L[positions]
    out_L = ids_L.copy()
    u = rng.random(k)
    out_L[positions[u < 0.8]] = self.mask_id
    swap = positions[(u >= 0.8) & (u < 0.9)]
    out_L[swap] = self.replacements[rng.integers(len(self.replacements), size=len(swap))]
    p = self.max_predictions
    positions_P = np.zeros(p, np.int32)
    labels_P = np.zeros(p, np.int32)
    weights_P = np.zeros(p, np.float32)
    positions_P[:k], labels_P[:k], weights_P[:k] = positions, labels, 1.0
    return out_L, positions_P, labels_P, weights_P

  def _whole_words(self, ids_L, cand, k, rng) -> np.ndarray:
    if not len(cand):
      return cand
    starts = self.word_start[ids_L[cand]]
    starts[0] = True
    starts[1:] |= np.diff(cand) != 1  # a special token in between ends the word
    group = np.cumsum(starts) - 1
    sizes = np.bincount(group)
    # As in google-research/bert: take words in random order, skipping any that overflow.
    order = rng.permutation(len(sizes))
    fits = int(np.searchsorted(np.cumsum(sizes[order]), k, side="right"))  # a prefix fits whole
    chosen = order[:fits].tolist()
    left = k - int(sizes[chosen].sum())
    rest = order[fits:]
    for g in rest[sizes[rest] <= left].tolist():
      if sizes[g] <= left:
        chosen.append(g)
        left -= sizes[g]
    return cand[np.isin(group, chosen)]
