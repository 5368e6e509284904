"""The input pipeline: batches, determinism, epochs, saved positions, shards, config errors."""

import json

import numpy as np
import pytest

from plmjax.config import base_config, validate
from plmjax.data import pipeline
from plmjax.data import tokenizer as tk
from plmjax.data.tokenizer_train import train_tokenizer
from plmjax.errors import ConfigError, DataError

import synthetic

_CACHE = {}


@pytest.fixture
def data(tmp_path_factory):
  """A self-made corpus (train + eval files) and a BERT and a GPT tokenizer trained on it."""
  if not _CACHE:
    root = tmp_path_factory.mktemp("pipeline")
    texts = synthetic.synthetic_texts(120, seed=7)
    _CACHE["train"] = synthetic.write_corpus(str(root / "train.jsonl"), texts[:100])
    _CACHE["eval"] = synthetic.write_corpus(str(root / "eval.txt"), texts[100:])
    for kind in ("bert", "gpt"):
      path = train_tokenizer(texts, 300, "bpe", str(root / kind), kind=kind)
      _CACHE[kind] = tk.load_tokenizer(path)
  return _CACHE


def _config(data, arch, **data_overrides):
  c = base_config(arch)
  c.model.vocab_size = data[arch].vocab_size
  c.data.update(dict(dict(train=data["train"], eval=data["eval"], max_seq_len=32,
                          max_predictions_per_seq=6), **data_overrides))
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x) for x, y in zip(a, b))


CASES = [("bert", {}), ("bert", dict(packing=True)), ("bert", dict(nsp=False)),
         ("bert", dict(whole_word_masking=True)), ("gpt", {}), ("gpt", dict(packing=True))]


@pytest.mark.parametrize("arch,overrides", CASES)
def test_batches_have_the_contract_shapes(data, arch, overrides):
  c = _config(data, arch, **overrides)
  batch = next(pipeline.make_pretrain_iterator(c, data[arch], batch_size=4))
  if arch == "gpt":
    keys = {"input_ids": (4, 32), "targets": (4, 32), "loss_weights": (4, 32)}
    if overrides.get("packing"):
      keys.update(segment_ids=(4, 32), position_ids=(4, 32))
  else:
    keys = {"input_ids": (4, 32), "token_type_ids": (4, 32), "attention_mask": (4, 32),
            "masked_positions": (4, 6), "masked_labels": (4, 6), "masked_weights": (4, 6),
            "nsp_labels": (4,)}
    if overrides.get("packing"):
      s = pipeline.max_pairs_per_row(c)
      keys.update(segment_ids=(4, 32), position_ids=(4, 32), cls_positions=(4, s),
                  nsp_labels=(4, s), nsp_weights=(4, s))
    if overrides.get("nsp") is False:
      keys["nsp_weights"] = (4,)
  assert {k: v.shape for k, v in batch.items()} == keys
  for k, v in batch.items():
    assert v.dtype == (np.float32 if "weights" in k else np.int32), k


@pytest.mark.parametrize("arch,overrides", [CASES[0], CASES[1], CASES[5]])
def test_same_seed_same_batches(data, arch, overrides):
  c = _config(data, arch, **overrides)
  a = _take(pipeline.make_pretrain_iterator(c, data[arch], batch_size=4), 5)
  b = _take(pipeline.make_pretrain_iterator(c, data[arch], batch_size=4), 5)
  c.train.seed = 1
  other = _take(pipeline.make_pretrain_iterator(c, data[arch], batch_size=4), 5)
  assert _same(a, b) and not _same(a, other)


@pytest.mark.parametrize("arch,overrides", [CASES[0], CASES[1], CASES[5]])
def test_restored_position_continues_like_never_stopping(data, arch, overrides):
  c = _config(data, arch, **overrides)
  it = pipeline.make_pretrain_iterator(c, data[arch], batch_size=8)
  epoch_batches = it.examples_per_epoch // 8
  _take(it, epoch_batches - 1)  # the next batches cross into the second epoch
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 4)
  resumed = pipeline.make_pretrain_iterator(c, data[arch], batch_size=8)
  resumed.set_state(state)
  assert _same(_take(resumed, 4), expected)


def test_epochs_repeat_with_new_shuffles(data):
  c = _config(data, "gpt")
  it = pipeline.make_pretrain_iterator(c, data["gpt"], batch_size=5)
  n = it.examples_per_epoch
  rows = np.concatenate([b["input_ids"] for b in _take(it, -(-2 * n // 5))])
  reference = pipeline.make_examples(c, data["gpt"], pipeline.load_corpus(c, data["gpt"]))
  all_rows = sorted(reference.example(i)["input_ids"].tobytes() for i in range(n))
  first, second = rows[:n], rows[n:2 * n]
  assert sorted(r.tobytes() for r in first) == all_rows  # each epoch: every row once
  assert sorted(r.tobytes() for r in second) == all_rows
  assert not (first == second).all()  # in a different order


def test_eval_split_is_in_order_and_repeats(data):
  c = _config(data, "gpt")
  it = pipeline.make_pretrain_iterator(c, data["gpt"], split="eval", batch_size=2)
  reference = pipeline.make_examples(c, data["gpt"],
                                     pipeline.load_corpus(c, data["gpt"], split="eval"))
  n = len(reference)
  rows = np.concatenate([b["input_ids"] for b in _take(it, n)])  # two passes
  expected = np.stack([reference.example(i % n)["input_ids"] for i in range(2 * n)])
  assert (rows == expected).all()
  c.data.eval = ""
  with pytest.raises(ConfigError, match="config.data.eval is empty"):
    pipeline.make_pretrain_iterator(c, data["gpt"], split="eval", batch_size=2)


@pytest.mark.parametrize("n", [2, 3])
def test_process_shards_are_disjoint_and_cover(data, n):
  c = _config(data, "gpt")
  tok = data["gpt"]
  whole = pipeline.load_corpus(c, tok)
  parts = [pipeline.load_corpus(c, tok, process_index=i, process_count=n) for i in range(n)]

  def docs(corpus):
    s = corpus.document_starts()
    return [corpus.tokens[a:b].tobytes() for a, b in zip(s[:-1], s[1:])]

  pieces = [d for p in parts for d in docs(p)]
  assert sorted(pieces) == sorted(docs(whole)) and len(set(pieces)) == len(pieces)
  its = [pipeline.make_pretrain_iterator(c, tok, batch_size=4, process_index=i, process_count=n)
         for i in range(n)]
  assert sum(it.examples_per_epoch for it in its) >= len(
      pipeline.make_examples(c, tok, whole))
  assert not _same([next(its[0])], [next(its[1])])


def test_config_and_tokenizer_errors(data, tmp_path):
  c = _config(data, "bert")
  c.model.vocab_size = 1000
  with pytest.raises(DataError, match="set config.model.vocab_size=300"):
    pipeline.make_pretrain_iterator(c, data["bert"], batch_size=2)
  c = _config(data, "bert", max_seq_len=600)  # config values alone: one place checks them
  with pytest.raises(ConfigError,
                     match="config.data.max_seq_len=600 .*max_position_embeddings=512"):
    validate(c)
  c = _config(data, "gpt")
  with pytest.raises(DataError, match="lacks <\\|endoftext\\|>"):
    pipeline.make_pretrain_iterator(c, data["bert"], batch_size=2)
  c = _config(data, "bert", train=str(tmp_path / "missing*.jsonl"))
  with pytest.raises(DataError, match="config.data.train='.*missing\\*.jsonl' matches no files"):
    pipeline.make_pretrain_iterator(c, data["bert"], batch_size=2)
  it = pipeline.make_pretrain_iterator(_config(data, "bert"), data["bert"], batch_size=2)
  state = it.get_state()
  other = pipeline.make_pretrain_iterator(_config(data, "bert"), data["bert"], batch_size=4)
  with pytest.raises(DataError, match="batch_size=2"):
    other.set_state(state)


def test_worker_processes_give_the_same_batches(data):
  c = _config(data, "bert")
  expected = _take(pipeline.make_pretrain_iterator(c, data["bert"], batch_size=4), 6)
  c.data.num_workers = 1
  from absl import flags
  if not flags.FLAGS.is_parsed():  # what the plmjax command does at start
    with pytest.raises(ConfigError, match="read absl flags"):
      pipeline.make_pretrain_iterator(c, data["bert"], batch_size=4)
    flags.FLAGS(["pytest"], known_only=True)
  it = pipeline.make_pretrain_iterator(c, data["bert"], batch_size=4)
  try:
    got = _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
  finally:
    it.close()
  resumed = pipeline.make_pretrain_iterator(c, data["bert"], batch_size=4)
  try:
    resumed.set_state(state)
    got += _take(resumed, 3)
  finally:
    resumed.close()
  assert _same(got, expected)


@pytest.mark.parametrize("arch, overrides", [
    ("bert", {}), ("bert", dict(nsp=False)), ("bert", dict(packing=True)),
    ("gpt", {}), ("gpt", dict(packing=True))])
def test_batch_spec_is_what_the_iterator_gives(data, arch, overrides):
  c = _config(data, arch, **overrides)
  batch = next(pipeline.make_pretrain_iterator(c, data[arch], batch_size=3))
  got = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in batch.items()}
  want = {k: (shape, np.dtype(dtype)) for k, (shape, dtype) in pipeline.batch_spec(c, 3).items()}
  assert got == want
