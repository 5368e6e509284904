"""Made-up data for tests and benchmarks that must not need real data.

`synthetic_texts`: English-like documents of pseudo-words drawn with a Zipf-like
frequency, so a tokenizer learns real merges. `SyntheticBert`: BERT pretraining
batches for trainer tests, resumable. Everything is deterministic in the seed.
"""

import json
import os

import numpy as np

_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "pe", "da", "gri", "sto", "lan",
              "mer", "qui", "zor", "bel", "fen", "ho", "ju")


def _words(n: int, rng: np.random.Generator) -> list[str]:
  words = set()
  while len(words) < n:
    words.add("".join(rng.choice(_SYLLABLES, size=rng.integers(1, 4))))
  return sorted(words)


def synthetic_texts(num_docs: int, *, seed: int = 0, vocab: int = 300,
                    paragraphs: tuple[int, int] = (1, 4),
                    sentences: tuple[int, int] = (2, 8)) -> list[str]:
  """`num_docs` documents; paragraphs separated by '\\n', sentences ending in '.'."""
  rng = np.random.default_rng(seed)
  words = _words(vocab, rng)
  p = 1.0 / np.arange(1, vocab + 1)
  p /= p.sum()
  docs = []
  for _ in range(num_docs):
    paras = []
    for _ in range(rng.integers(*paragraphs, endpoint=True)):
      sents = []
      for _ in range(rng.integers(*sentences, endpoint=True)):
        ws = [words[i] for i in rng.choice(vocab, size=rng.integers(3, 15), p=p)]
        sents.append(" ".join(ws).capitalize() + ".")
      paras.append(" ".join(sents))
    docs.append("\n".join(paras))
  return docs


def write_corpus(path: str, texts: list[str]) -> str:
  """Writes `.jsonl` (a `text` field per line) or `.txt` (blank line between documents)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    if path.endswith(".jsonl"):
      f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    else:
      f.write("\n\n".join(texts) + "\n")
  return path


class Resumable:
  """An endless batch iterator with the get_state/set_state of plmjax's pipelines:
  batch i is made by `make(rng)` from a generator seeded with (seed, i)."""
  seed = 0
  index = 0

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = int(state["index"])

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng((self.seed, self.index))
    self.index += 1
    return self.make(rng)


class SyntheticBert(Resumable):
  """BERT pretraining batches of random tokens with a learnable MLM signal
  (the label of a masked position is the token just before it)."""

  def __init__(self, batch_size, seq_len=16, vocab=64, preds=4, seed=0):
    self.b, self.l, self.v, self.p, self.seed = batch_size, seq_len, vocab, preds, seed

  def make(self, rng):
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
