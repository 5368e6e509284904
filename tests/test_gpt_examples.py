"""GPT examples: the joined stream, packing keeps every token once, segments and positions."""

import types

import numpy as np
import pytest

from plmjax.data import sources
from plmjax.data import tokenizer as tk
from plmjax.data.tokenizer_train import train_tokenizer
from plmjax.data.corpus import TokenizedCorpus, tokenize_documents
from plmjax.data.gpt_examples import GptExamples

EOT = 0


def _corpus(doc_lengths, seed=0):
  """Documents of the given lengths (one segment each) with token ids >= 1."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 100, size=sum(doc_lengths)).astype(np.int32)
  offsets = np.r_[0, np.cumsum(doc_lengths)]
  return TokenizedCorpus(tokens, offsets, np.arange(len(doc_lengths) + 1))


FAKE_TOK = types.SimpleNamespace(eos_id=EOT)


def _stream(corpus):
  starts = corpus.document_starts()
  return np.concatenate([np.r_[corpus.tokens[a:b], EOT] for a, b in zip(starts[:-1], starts[1:])])


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("lengths", [[5, 17, 3, 40, 1, 9], [64], [7] * 20])
def test_every_token_is_an_input_once(lengths, packing):
  corpus = _corpus(lengths)
  examples = GptExamples(corpus, FAKE_TOK, max_seq_len=16, packing=packing)
  stream = _stream(corpus)
  rows = [examples.example(i) for i in range(len(examples))]
  inputs = np.concatenate([r["input_ids"][r["loss_weights"] > 0] for r in rows])
  targets = np.concatenate([r["targets"][r["loss_weights"] > 0] for r in rows])
  assert (inputs == stream[:-1]).all() and (targets == stream[1:]).all()
  assert len(examples) == -(-(len(stream) - 1) // 16)
  for r in rows:
    assert all(v.shape == (16,) for v in r.values())
    assert set(r) == ({"input_ids", "targets", "loss_weights"} |
                      ({"segment_ids", "position_ids"} if packing else set()))
    w = r["loss_weights"]
    n = int(w.sum())
    assert (w[:n] == 1).all() and (w[n:] == 0).all()  # padding only at the end of the last row


def test_segments_and_positions_restart_per_document():
  corpus = _corpus([5, 17, 3, 40])
  examples = GptExamples(corpus, FAKE_TOK, max_seq_len=16, packing=True)
  stream = _stream(corpus)
  doc_of = np.repeat(np.arange(4), np.array([5, 17, 3, 40]) + 1)  # the EOT ends its document
  for i in range(len(examples)):
    r = examples.example(i)
    n = int(r["loss_weights"].sum())
    span = np.arange(i * 16, i * 16 + n)
    seg, pos = r["segment_ids"], r["position_ids"]
    assert (seg[n:] == 0).all() and (pos[n:] == 0).all() and seg[0] == 1
    assert (seg[:n] == doc_of[span] - doc_of[span[0]] + 1).all()
    for s in np.unique(seg[:n]):
      where = np.flatnonzero(seg == s)
      assert (pos[where] == np.arange(len(where))).all()
      eots = where[r["input_ids"][where] == EOT]
      assert len(eots) <= 1 and (len(eots) == 0 or eots[0] == where[-1])
    assert (r["input_ids"][:n] == stream[span]).all()


def test_real_text_rows(tmp_path, wiki_sample):
  path = train_tokenizer(str(wiki_sample), 500, "bpe", str(tmp_path / "gpt"), kind="gpt",
                            max_sentences=1000)
  tok = tk.load_tokenizer(path)
  docs = sources.read_documents(str(wiki_sample))[:10]
  corpus = tokenize_documents(docs, tok)
  examples = GptExamples(corpus, tok, max_seq_len=32, packing=True)
  assert len(examples) == -(-(corpus.num_tokens + 10 - 1) // 32)
  r = examples.example(3)
  assert r["input_ids"].dtype == np.int32 and r["loss_weights"].dtype == np.float32
  assert (r["targets"][:-1] == r["input_ids"][1:]).all()
  joined = np.concatenate([examples.example(i)["input_ids"] for i in range(len(examples))])
  assert (joined == tok.eos_id).sum() >= 9  # the 10 documents are joined by <|endoftext|>
  assert tok.decode(examples.example(0)["input_ids"]).startswith(docs[0][0][:20])
