"""BERT examples: chunks, truncation, pairs, NSP, masking statistics, packing."""

import numpy as np
import pytest

from plmjax.data import sources
from plmjax.data import tokenizer as tk
from plmjax.data.tokenizer_train import train_tokenizer
from plmjax.data.bert_examples import (MIN_FILL, BertExamples, make_chunks, truncate_pair,
                                       truncation_counts)
from plmjax.data.bert_packing import PackedBertExamples, pack_rows
from plmjax.data.corpus import TokenizedCorpus, tokenize_documents

import synthetic

L, P = 64, 12


_CACHE = {}  # built once per module from the function-scoped `wiki_sample` fixture


def _once(key, make):
  if key not in _CACHE:
    _CACHE[key] = make()
  return _CACHE[key]


@pytest.fixture
def tok(tmp_path_factory, wiki_sample):
  def make():
    out = str(tmp_path_factory.mktemp("tok") / "bert")
    return tk.load_tokenizer(train_tokenizer(str(wiki_sample), 800, "bpe", out,
                                                max_sentences=2000))
  return _once("tok", make)


@pytest.fixture(params=["wiki", "synthetic"])
def corpus(request, tok, wiki_sample):
  def make():
    if request.param == "wiki":
      docs = sources.read_documents(str(wiki_sample))[:40]
    else:
      docs = [sources.text_to_segments(t) for t in synthetic.synthetic_texts(150, seed=3)]
    return tokenize_documents(docs, tok)
  return _once(request.param, make)


def _original(ex):
  ids = ex["input_ids"].copy()
  k = ex["masked_weights"] > 0
  ids[ex["masked_positions"][k]] = ex["masked_labels"][k]
  return ids


def test_truncation_counts_match_google_loop():
  for la in range(1, 16):
    for lb in range(1, 16):
      for budget in range(2, 32):
        a, b = la, lb
        while a + b > budget:  # google-research/bert truncate_seq_pair, counting only
          if a > b:
            a -= 1
          else:
            b -= 1
        assert truncation_counts(la, lb, budget) == (la - a, lb - b), (la, lb, budget)


def test_truncate_pair_keeps_contiguous_pieces():
  rng = np.random.default_rng(0)
  a, b = np.arange(50), np.arange(100, 130)
  front_cuts = []
  for _ in range(200):
    ta, tb = truncate_pair(a, b, 40, rng)
    assert (len(ta), len(tb)) == (20, 20)  # A loses 30 (down to B's length, then alternating)
    assert (np.diff(ta) == 1).all() and (np.diff(tb) == 1).all()
    front_cuts.append(ta[0])
  assert abs(np.mean(front_cuts) - 15) < 1  # each token removed from a random end


def test_chunks_cover_each_document_once(corpus):
  chunks = make_chunks(corpus, 61, 0.1, np.random.default_rng(0))
  assert chunks.start[0] == 0 and chunks.end[-1] == corpus.num_tokens
  assert (chunks.start[1:] == chunks.end[:-1]).all()
  lengths = chunks.end - chunks.start
  assert (lengths >= 1).all() and (lengths <= chunks.target).all() and (chunks.target <= 61).all()
  starts = corpus.document_starts()
  assert (starts[chunks.doc] <= chunks.start).all() and (chunks.end <= starts[chunks.doc + 1]).all()
  assert 0.03 < np.mean(chunks.target < 61) < 0.2  # short_seq_prob
  assert np.mean(lengths) > 0.75 * 61 * 0.9  # chunks are mostly full


def test_pairs_layout_nsp_and_continuations(corpus, tok):
  examples = BertExamples(corpus, tok, max_seq_len=L, max_predictions_per_seq=P, seed=1)
  labels = []
  for i in range(min(len(examples), 400)):
    ex = examples.example(i, epoch=0)
    assert {k: (v.shape, v.dtype.name) for k, v in ex.items()} == {
        "input_ids": ((L,), "int32"), "token_type_ids": ((L,), "int32"),
        "attention_mask": ((L,), "int32"), "masked_positions": ((P,), "int32"),
        "masked_labels": ((P,), "int32"), "masked_weights": ((P,), "float32"),
        "nsp_labels": ((), "int32")}
    ids = _original(ex)
    n = int(ex["attention_mask"].sum())
    assert (ex["attention_mask"][:n] == 1).all() and (ids[n:] == tok.pad_id).all()
    seps = np.flatnonzero(ids == tok.sep_id)
    assert ids[0] == tok.cls_id and len(seps) == 2 and seps[1] == n - 1 and n <= L
    assert (ex["token_type_ids"] == np.r_[np.zeros(seps[0] + 1), np.ones(n - seps[0] - 1),
                                          np.zeros(L - n)]).all()
    a, b = ids[1:seps[0]], ids[seps[0] + 1:n - 1]
    assert len(a) >= 1 and len(b) >= 1
    chunks = examples.chunks
    start, a_end, end = chunks.start[i], chunks.a_end[i], chunks.end[i]
    assert ex["nsp_labels"] == chunks.is_random[i]
    if ex["nsp_labels"] == 0:  # B is the true continuation: A + B is the chunk
      assert (np.concatenate([a, b]) == corpus.tokens[start:end]).all()
      assert len(a) == a_end - start and a_end in corpus.segment_offsets  # whole segments
    else:  # A is the chunk, maybe truncated at either end
      assert a_end == end and _is_slice_of(a, corpus.tokens[start:end])
  # A random B is a run of another document (pairs are views into corpus.tokens).
  doc_starts, rng = corpus.document_starts(), np.random.default_rng(0)
  randoms = 0
  for c in range(min(len(examples), 200)):
    a, b, is_random = examples.make_pair(c, rng, L - 3)
    if is_random:
      offset = (b.ctypes.data - corpus.tokens.ctypes.data) // corpus.tokens.itemsize
      doc = np.searchsorted(doc_starts, offset, side="right") - 1
      assert doc != examples.chunks.doc[c] and offset + len(b) <= doc_starts[doc + 1]
      randoms += 1
  assert randoms > 50


def _is_slice_of(x, y) -> bool:
  return any((y[f:f + len(x)] == x).all() for f in range(len(y) - len(x) + 1))


def _inner_boundaries(corpus, start, end) -> int:
  off = corpus.segment_offsets
  return int(np.searchsorted(off, end, "left") - np.searchsorted(off, start, "right"))


def test_a_single_segment_chunk_is_never_isnext(corpus, tok):
  examples = BertExamples(corpus, tok, max_seq_len=L, max_predictions_per_seq=P, seed=3)
  chunks = examples.chunks
  inner = np.array([_inner_boundaries(corpus, s, e) for s, e in zip(chunks.start, chunks.end)])
  single = inner == 0  # long segments, cut ones, short targets; and As put back to one
  assert 100 < single.sum() < len(chunks) - 100
  assert chunks.is_random[single].all()
  for i in np.flatnonzero(single)[:150]:
    for epoch in (0, 1):
      assert examples.example(int(i), epoch)["nsp_labels"] == 1


def test_isnext_half_the_time_when_chunks_have_many_segments(tok):
  rng = np.random.default_rng(0)
  seg_len = rng.integers(3, 8, size=24000)  # 10-20 segments per chunk
  corpus = TokenizedCorpus(rng.integers(5, tok.vocab_size, seg_len.sum()).astype(np.int32),
                           np.r_[0, np.cumsum(seg_len)], np.arange(0, 24001, 60))
  chunks = BertExamples(corpus, tok, max_seq_len=L, max_predictions_per_seq=P).chunks
  assert len(chunks) > 2500
  assert 0.46 < 1 - chunks.is_random.mean() < 0.54


def test_segments_a_random_b_leaves_out_start_the_next_chunk(corpus, tok):
  chunks = BertExamples(corpus, tok, max_seq_len=L, max_predictions_per_seq=P, seed=4).chunks
  # Every token is in exactly one chunk (in A, or in an IsNext B): none is dropped.
  assert chunks.start[0] == 0 and chunks.end[-1] == corpus.num_tokens
  assert (chunks.start[1:] == chunks.end[:-1]).all()
  assert (chunks.start < chunks.a_end).all() and (chunks.a_end <= chunks.end).all()
  assert (chunks.a_end == chunks.end)[chunks.is_random].all()
  # A chunk that ends short of MIN_FILL before its document's end was cut short by a
  # random B: the segments after its A were put back and start the next chunk.
  doc_end = corpus.document_starts()[chunks.doc + 1]
  short = (chunks.end - chunks.start < MIN_FILL * chunks.target) & (chunks.end < doc_end)
  assert short.sum() > 50 and chunks.is_random[short].all()
  nxt = np.flatnonzero(short) + 1
  assert (chunks.start[nxt] == chunks.a_end[nxt - 1]).all()
  assert (chunks.doc[nxt] == chunks.doc[nxt - 1]).all()
  assert np.isin(chunks.start[nxt], corpus.segment_offsets).all()
  # Without NSP nothing is put back: only a document's last chunk ends that short.
  plain = BertExamples(corpus, tok, max_seq_len=L, max_predictions_per_seq=P, nsp=False,
                       seed=4).chunks
  doc_end = corpus.document_starts()[plain.doc + 1]
  assert not ((plain.end - plain.start < MIN_FILL * plain.target) & (plain.end < doc_end)).any()
  assert not plain.is_random.any() and (plain.a_end == plain.end).all()


def test_examples_are_deterministic_in_seed_epoch_index(corpus, tok):
  make = lambda seed: BertExamples(corpus, tok, max_seq_len=L, max_predictions_per_seq=P,
                                   seed=seed)
  a, b, c = make(0), make(0), make(1)
  same = lambda x, y: all((x[k] == y[k]).all() for k in x)
  assert all(same(a.example(i, 2), b.example(i, 2)) for i in range(20))
  assert sum(same(a.example(i, 0), a.example(i, 1)) for i in range(20)) <= 2
  assert sum(same(a.example(i, 0), c.example(i, 0)) for i in range(20)) <= 2


@pytest.mark.parametrize("whole_word", [False, True])
def test_masking_statistics(tok, wiki_sample, whole_word):
  corpus = _once("wiki_all", lambda: tokenize_documents(
      sources.read_documents(str(wiki_sample)), tok))
  examples = BertExamples(corpus, tok, max_seq_len=128, max_predictions_per_seq=24,
                          whole_word_masking=whole_word, seed=5)
  special = np.array(sorted(tok.special_ids))
  candidates = chosen = as_mask = kept = words_masked = 0
  for i in range(0, len(examples), max(1, len(examples) // 1500)):
    ex = examples.example(i, epoch=3)
    ids, w = _original(ex), ex["masked_weights"]
    k = int(w.sum())
    pos, lab = ex["masked_positions"], ex["masked_labels"]
    assert (w[:k] == 1).all() and (w[k:] == 0).all()
    assert (pos[k:] == 0).all() and (lab[k:] == 0).all()
    assert (np.diff(pos[:k]) > 0).all() and not np.isin(lab[:k], special).any()
    replaced = ex["input_ids"][ex["input_ids"] != ids]
    assert not np.isin(replaced, special[special != tok.mask_id]).any()
    changed = np.flatnonzero(ex["input_ids"] != ids)
    assert np.isin(changed, pos[:k]).all()  # only chosen positions are altered
    candidates += int((~np.isin(ids, special)).sum())
    chosen += k
    as_mask += int((ex["input_ids"][pos[:k]] == tok.mask_id).sum())
    kept += int((ex["input_ids"][pos[:k]] == lab[:k]).sum())
    if whole_word:
      masked = np.zeros(128, bool)
      masked[pos[:k]] = True
      plain = ~np.isin(ids, special)
      cont = np.r_[False, ~tok.is_word_start(ids[1:]) & plain[1:] & plain[:-1]]
      # a masked continuation piece has its word's previous piece masked, and vice versa
      assert (masked[cont] == masked[np.flatnonzero(cont) - 1]).all()
      words_masked += int((masked & ~cont).sum())
  if whole_word:
    assert words_masked < 0.9 * chosen  # many masked words span several pieces
  rate = chosen / candidates
  print(f"whole_word={whole_word}: rate {rate:.4f}, [MASK] {as_mask / chosen:.4f}, "
        f"kept {kept / chosen:.4f} of {chosen} predictions")
  assert abs(rate - 0.15) < 0.01, rate
  assert abs(as_mask / chosen - 0.8) < 0.02 and abs(kept / chosen - 0.1) < 0.02
  assert abs((chosen - as_mask - kept) / chosen - 0.1) < 0.02


def test_without_nsp_rows_are_single_segments(corpus, tok):
  examples = BertExamples(corpus, tok, max_seq_len=L, max_predictions_per_seq=P, nsp=False)
  for i in range(0, len(examples), 7):
    ex = examples.example(i)
    ids = _original(ex)
    n = int(ex["attention_mask"].sum())
    assert ids[0] == tok.cls_id and ids[n - 1] == tok.sep_id and (ids == tok.sep_id).sum() == 1
    assert (ex["token_type_ids"] == 0).all() and ex["nsp_labels"] == 0 and ex["nsp_weights"] == 0
    start, end = examples.chunks.start[i], examples.chunks.end[i]
    assert (ids[1:n - 1] == corpus.tokens[start:end]).all()


def test_pack_rows_fills_rows_within_limits():
  sizes = np.random.default_rng(0).integers(5, 65, size=500)
  offsets, items = pack_rows(sizes, 64, 4, np.random.default_rng(1))
  assert sorted(items.tolist()) == list(range(500))
  per_row = np.add.reduceat(sizes[items], offsets[:-1])
  assert (per_row <= 64).all() and (np.diff(offsets) <= 4).all()
  assert per_row.sum() / (64 * len(per_row)) > 0.8


@pytest.mark.parametrize("nsp", [True, False])
def test_packed_rows(corpus, tok, nsp):
  s = 4
  examples = PackedBertExamples(corpus, tok, max_seq_len=L, max_predictions_per_seq=P,
                                max_pairs_per_row=s, short_seq_prob=0.5, nsp=nsp, seed=2)
  assert len(examples) < len(examples.chunks)  # short pairs share rows
  assert sorted(examples.row_items.tolist()) == list(range(len(examples.chunks)))
  for i in range(min(len(examples), 250)):
    ex = examples.example(i, epoch=1)
    ids, seg, pos = _original(ex), ex["segment_ids"], ex["position_ids"]
    k = int(seg.max())
    n = int((seg > 0).sum())
    assert (seg[:n] > 0).all() and (seg[n:] == 0).all() and (np.diff(seg[:n]) >= 0).all()
    assert (ex["attention_mask"] == (seg > 0)).all() and (ids[n:] == tok.pad_id).all()
    assert (ex["nsp_weights"] == np.r_[np.full(k, float(nsp)), np.zeros(s - k)]).all()
    for j in range(1, k + 1):
      where = np.flatnonzero(seg == j)
      assert ex["cls_positions"][j - 1] == where[0] and ids[where[0]] == tok.cls_id
      assert (pos[where] == np.arange(len(where))).all()
      assert (ids[where] == tok.sep_id).sum() == (2 if nsp else 1) and ids[where[-1]] == tok.sep_id
      types = ex["token_type_ids"][where]
      assert types[0] == 0 and (np.diff(types) >= 0).all() and (nsp or not types.any())
    items = examples.row_items[examples.row_offsets[i]:examples.row_offsets[i + 1]]
    assert (ex["nsp_labels"][:k] == (examples.chunks.is_random[items] & nsp)).all()
    w = ex["masked_weights"] > 0
    assert (seg[ex["masked_positions"][w]] > 0).all()


def test_chunks_are_the_same_whatever_the_block_size(corpus):
  def chunks(block):
    return make_chunks(corpus, 40, 0.3, np.random.default_rng(5), np.random.default_rng(6),
                       block_documents=block)
  whole = chunks(10**6)
  for block in (1, 3):
    part = chunks(block)
    for name in ("start", "end", "doc", "target", "a_end", "is_random"):
      assert np.array_equal(getattr(part, name), getattr(whole, name)), (block, name)


def test_chunk_and_row_tables_are_kept_for_the_next_start(corpus, tok, tmp_path, monkeypatch):
  from plmjax.data import bert_examples, bert_packing
  make = lambda seed=2, cache_dir=str(tmp_path): PackedBertExamples(
      corpus, tok, max_seq_len=L, max_predictions_per_seq=P, max_pairs_per_row=4, seed=seed,
      cache_dir=cache_dir)
  first, plain = make(), make(cache_dir=None)
  tables = sorted(p.name for p in tmp_path.iterdir())
  assert len(tables) == 2 and all(t.startswith("index-") for t in tables)  # chunks, rows

  def fail(*args, **kwargs):
    raise AssertionError("built again")
  with monkeypatch.context() as m:  # the next start only loads them
    m.setattr(bert_examples, "make_chunks", fail)
    m.setattr(bert_packing, "pack_rows", fail)
    again = make()
    with pytest.raises(AssertionError, match="built again"):
      make(seed=3)  # other settings, other tables
  for i in (0, len(plain) // 2, len(plain) - 1):
    for ex in (first.example(i, epoch=1), again.example(i, epoch=1)):
      assert all(np.array_equal(v, plain.example(i, epoch=1)[k]) for k, v in ex.items())
  # A damaged table is built again, not trusted.
  damaged = next(p for p in tmp_path.glob("index-*/start.npy"))
  damaged.write_bytes(b"not a numpy file")
  assert np.array_equal(make().chunks.start, plain.chunks.start)
  assert sorted(p.name for p in tmp_path.iterdir()) == tables
