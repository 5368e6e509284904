"""Made-up English-like text, for tests and benchmarks that must not need real data.

Words are drawn from a fixed list of pseudo-words with a Zipf-like frequency, so a
tokenizer learns real merges; everything is deterministic in the seed.
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
