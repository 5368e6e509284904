"""`plmjax data prepare` and prepared directories: same examples as the raw files, exact
resume, worker-count independence, continuing an interrupted prepare, manifest checks."""

import json
import os
import pathlib

import numpy as np
import pytest

from plmjax import cli
from plmjax.config import base_config
from plmjax.data import corpus as corpus_lib
from plmjax.data import gpt_examples, pipeline, prepare, prepared, sources
from plmjax.data import tokenizer as tk
from plmjax.data.tokenizer_train import train_tokenizer
from plmjax.errors import DataError
from plmjax.train import pretrain

import synthetic

SHARD = 4000  # bytes of text per shard: the corpus makes about a dozen shards
PIECE = 64  # tokens per record: most documents are several records


def _prepare(spec, tokenizer, out, **kwargs):
  return prepare.prepare(spec, tokenizer, out, shard_bytes=SHARD, piece_tokens=PIECE, **kwargs)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Two raw files (.jsonl and .txt), BERT and GPT tokenizers, and both prepared."""
  root = tmp_path_factory.mktemp("prepare")
  texts = synthetic.synthetic_texts(70, seed=11)
  synthetic.write_corpus(str(root / "raw" / "a.jsonl"), texts[:40])
  synthetic.write_corpus(str(root / "raw" / "b.txt"), texts[40:])
  d = dict(root=root, raw=str(root / "raw" / "*"))
  for kind in ("bert", "gpt"):
    d[kind] = tk.load_tokenizer(train_tokenizer(texts, 300, "bpe", str(root / kind), kind=kind))
    d[f"{kind}_dir"] = str(root / f"prepared_{kind}")
    _prepare(d["raw"], d[kind], d[f"{kind}_dir"])
  return d


def _config(data, arch, train, **overrides):
  c = base_config(arch)
  c.model.vocab_size = data[arch].vocab_size
  c.data.update(dict(train=train, max_seq_len=32, max_predictions_per_seq=6), **overrides)
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x) for x, y in zip(a, b))


def _files(directory):
  root = pathlib.Path(directory)
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepared_corpus_is_the_tokenized_raw_corpus(data):
  whole = corpus_lib.tokenize_documents(sources.read_documents(data["raw"]), data["bert"])
  got = prepared.open_corpus(data["bert_dir"], data["bert"], model_vocab_size=300)
  assert (got.segment_offsets == whole.segment_offsets).all()
  assert (got.document_offsets == whole.document_offsets).all()
  assert (got.tokens[:] == whole.tokens).all()
  rng = np.random.default_rng(0)
  for a, b in np.sort(rng.integers(0, whole.num_tokens, (50, 2)), axis=1):
    assert (got.tokens[a:b] == whole.tokens[a:b]).all()
  manifest = prepared.read_manifest(data["bert_dir"])
  assert len(manifest["shards"]) > 5
  assert sum(s["records"] for s in manifest["shards"]) > 2 * manifest["documents"]  # pieces
  assert (manifest["documents"], manifest["segments"], manifest["tokens"]) == (
      whole.num_documents, whole.num_segments, whole.num_tokens)
  assert manifest["plan"]["tokenizer"]["fingerprint"] == prepared.fingerprint(data["bert"])
  # Process p of 3 reads documents p, p+3, ...: its own records, nothing else.
  for p in range(3):
    part = prepared.open_corpus(data["bert_dir"], data["bert"], model_vocab_size=300,
                                process_index=p, process_count=3)
    s = whole.document_starts()
    want = [whole.tokens[s[i]:s[i + 1]] for i in range(p, whole.num_documents, 3)]
    assert (part.tokens[:] == np.concatenate(want)).all()


@pytest.mark.parametrize("length,packing", [(7, False), (32, True)])
def test_lazy_gpt_stream_gives_the_gpt_rows(data, length, packing):
  whole = corpus_lib.tokenize_documents(sources.read_documents(data["raw"]), data["gpt"])
  want = gpt_examples.GptExamples(whole, data["gpt"], max_seq_len=length, packing=packing)
  got = prepared.StreamGptExamples(whole, data["gpt"], max_seq_len=length, packing=packing)
  assert len(got) == len(want) and len(got.stream) == len(want.stream)
  for i in range(len(want)):
    assert _same([got.example(i)], [want.example(i)])


CASES = [("bert", {}), ("bert", dict(packing=True)), ("gpt", {}), ("gpt", dict(packing=True))]


@pytest.mark.parametrize("arch,overrides", CASES)
def test_prepared_and_cached_give_the_raw_batches(data, arch, overrides, tmp_path):
  raw = _config(data, arch, data["raw"], **overrides)
  expected = _take(pipeline.make_pretrain_iterator(raw, data[arch], batch_size=4), 8)
  from_dir = _config(data, arch, data[f"{arch}_dir"], **overrides)
  assert _same(_take(pipeline.make_pretrain_iterator(from_dir, data[arch], batch_size=4), 8),
               expected)
  cached = pipeline.make_pretrain_iterator(raw, data[arch], batch_size=4, cache_dir=str(tmp_path))
  assert _same(_take(cached, 8), expected)
  assert isinstance(cached.examples.corpus.tokens if arch == "bert" else cached.examples.stream,
                    (prepared.PreparedTokens, prepared.EotStream))


def test_each_process_caches_its_own_share(data, tmp_path):
  c = _config(data, "bert", data["raw"])
  for p in range(2):
    where = dict(batch_size=4, process_index=p, process_count=2)
    expected = _take(pipeline.make_pretrain_iterator(c, data["bert"], **where), 4)
    cached = pipeline.make_pretrain_iterator(c, data["bert"], cache_dir=str(tmp_path), **where)
    assert _same(_take(cached, 4), expected)
  shares = [d.name for d in tmp_path.iterdir() if not d.name.startswith("index-")]
  assert sorted(name.split("-")[-1] for name in shares) == ["p0of2", "p1of2"]
  assert len(list(tmp_path.glob("index-*"))) == 2  # each share's BERT chunk table


@pytest.mark.parametrize("arch,overrides", [CASES[1], CASES[3]])
def test_resume_from_a_prepared_directory_is_exact(data, arch, overrides):
  c = _config(data, arch, data[f"{arch}_dir"], **overrides)
  it = pipeline.make_pretrain_iterator(c, data[arch], batch_size=8)
  _take(it, it.examples_per_epoch // 8 - 1)  # the next batches cross into the second epoch
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 4)
  resumed = pipeline.make_pretrain_iterator(c, data[arch], batch_size=8)
  resumed.set_state(state)
  assert _same(_take(resumed, 4), expected)


def test_grain_worker_processes_read_a_prepared_directory(data):
  from absl import flags
  if not flags.FLAGS.is_parsed():  # what the plmjax command does at start
    flags.FLAGS(["pytest"], known_only=True)
  c = _config(data, "bert", data["bert_dir"])
  expected = _take(pipeline.make_pretrain_iterator(c, data["bert"], batch_size=4), 3)
  c.data.num_workers = 1
  it = pipeline.make_pretrain_iterator(c, data["bert"], batch_size=4)
  try:
    assert _same(_take(it, 3), expected)
  finally:
    it.close()


def test_output_is_the_same_for_any_worker_count(data, tmp_path):
  out = str(tmp_path / "two_workers")
  _prepare(data["raw"], data["bert"].path, out, workers=2)
  assert _files(out) == _files(data["bert_dir"])


def test_an_interrupted_prepare_continues(data, tmp_path, monkeypatch):
  out = str(tmp_path / "interrupted")
  read = sources.iter_documents

  def interrupted(*args, **kwargs):
    for i, doc in enumerate(read(*args, **kwargs)):
      if i == 35:
        raise KeyboardInterrupt
      yield doc

  monkeypatch.setattr(sources, "iter_documents", interrupted)
  with pytest.raises(KeyboardInterrupt):
    _prepare(data["raw"], data["bert"], out)
  monkeypatch.setattr(sources, "iter_documents", read)
  kept = sorted(f for f in os.listdir(out) if f.endswith(".array_record"))
  assert len(kept) >= 2 and not os.path.exists(os.path.join(out, prepared.MANIFEST))
  c = _config(data, "bert", out)
  with pytest.raises(DataError, match="unfinished `plmjax data prepare`.*run the same command"):
    pipeline.make_pretrain_iterator(c, data["bert"], batch_size=4)
  # A shard cut short (killed while writing) is left under its temporary name.
  half = os.path.join(out, prepared.shard_name(len(kept)) + ".tmp")
  with open(half, "wb") as f:
    f.write(b"\x00" * 100)
  inodes = {f: os.stat(os.path.join(out, f)).st_ino for f in kept}
  manifest = _prepare(data["raw"], data["bert"], out)
  assert {f: os.stat(os.path.join(out, f)).st_ino for f in kept} == inodes  # kept, not redone
  assert not os.path.exists(half)
  assert _files(out) == _files(data["bert_dir"])
  assert manifest == prepared.read_manifest(data["bert_dir"])


def test_manifest_checks(data, tmp_path):
  other = tk.load_tokenizer(train_tokenizer(str(data["raw"]), 300, "unigram",
                                               str(tmp_path / "other"), kind="bert"))
  c = _config(data, "bert", data["bert_dir"])
  with pytest.raises(DataError, match="prepared with another tokenizer .*config.data.tokenizer="):
    pipeline.make_pretrain_iterator(c, other, batch_size=4)
  c.model.vocab_size = 200
  with pytest.raises(DataError, match="prepared with a 300-token vocabulary but "
                     "config.model.vocab_size=200"):
    pipeline.make_pretrain_iterator(c, data["bert"], batch_size=4)
  junk = tmp_path / "junk"
  junk.mkdir()
  (junk / "manifest.json").write_text('{"shards": []}')
  with pytest.raises(DataError, match="is not a plmjax prepared-corpus manifest"):
    pipeline.make_pretrain_iterator(_config(data, "bert", str(junk)), data["bert"], batch_size=4)
  stray = tmp_path / "stray"
  stray.mkdir()
  (stray / "notes.txt").write_text("mine")
  with pytest.raises(DataError, match="is not empty and holds no plmjax prepared corpus"):
    prepare.prepare(data["raw"], data["bert"], str(stray))
  with pytest.raises(DataError, match="holds a corpus prepared from another source, tokenizer"):
    _prepare(data["raw"], other, data["bert_dir"])
  assert _prepare(data["raw"], data["bert"], data["bert_dir"])


def test_bad_input_is_one_line_and_leaves_nothing(data, tmp_path, capsys):
  out = tmp_path / "out"
  for args, message in [
      (["--input", str(tmp_path / "none*.jsonl")], "matches no files"),
      (["--input", data["raw"], "--shard-size", "lots"], "--shard-size 'lots' is not a size"),
      (["--input", data["raw"], "--tokenizer", str(tmp_path / "no.model")], "does not exist")]:
    argv = ["data", "prepare", "--tokenizer", data["bert"].path, "--out", str(out)] + args
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "a.jsonl").write_text('{"text": "Fine. Words here."}\n')
  (bad / "b.jsonl").write_text("not json\n")
  assert cli.main(["data", "prepare", "--input", str(bad / "*.jsonl"), "--tokenizer",
                   data["bert"].path, "--out", str(out), "--workers", "1"]) == 2
  assert "b.jsonl:1: not valid JSON" in capsys.readouterr().err and not out.exists()


def _tiny(data, train, steps):
  c = _config(data, "bert", train)
  c.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                 max_position_embeddings=32, dropout_rate=0.0, attention_dropout_rate=0.0)
  c.data.tokenizer = data["bert"].path
  c.train.update(steps=steps, batch_size=8, warmup_steps=1, log_every_steps=1)
  c.checkpoint.update(every_steps=2, async_save=False)
  return c


def test_pretrain_on_a_prepared_dir_equals_the_raw_files(data, tmp_path, capsys):
  def losses(workdir):
    with open(workdir / "metrics.jsonl") as f:
      return [r["loss"] for r in map(json.loads, f) if "split" not in r]

  pretrain.run(_tiny(data, data["raw"], 2), str(tmp_path / "raw"))
  pretrain.run(_tiny(data, data["bert_dir"], 2), str(tmp_path / "prep"))
  assert losses(tmp_path / "raw") == losses(tmp_path / "prep") and len(losses(tmp_path / "raw"))
  # The raw source was prepared into the workdir once; the resume reads it again.
  cache = list((tmp_path / "raw" / "data_cache").glob("train-*/manifest.json"))
  assert len(cache) == 1
  written = cache[0].stat().st_mtime_ns
  pretrain.run(_tiny(data, data["raw"], 4), str(tmp_path / "raw"))
  assert cache[0].stat().st_mtime_ns == written
  # A prepared dir of another tokenizer: one error, before the workdir is written.
  c = _tiny(data, data["bert_dir"], 2)
  c.data.tokenizer = data["gpt"].path
  with pytest.raises(DataError, match="prepared with another tokenizer"):
    pretrain.run(c, str(tmp_path / "mismatch"))
  assert not (tmp_path / "mismatch").exists()


def test_a_tfds_source_is_prepared_like_it_is_read(data, tmp_path):
  import tensorflow_datasets as tfds

  class PlmjaxPrepareText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, text in enumerate(synthetic.synthetic_texts(12, seed=5)):
        yield i, {"text": text}

  data_dir = str(tmp_path / "tfds")
  PlmjaxPrepareText(data_dir=data_dir, file_format="array_record").download_and_prepare()
  spec = "tfds:plmjax_prepare_text:train"
  out = str(tmp_path / "prepared")
  _prepare(spec, data["bert"], out, tfds_data_dir=data_dir)
  whole = corpus_lib.tokenize_documents(sources.read_documents(spec, tfds_data_dir=data_dir),
                                        data["bert"])
  got = prepared.open_corpus(out, data["bert"], model_vocab_size=300)
  assert (got.tokens[:] == whole.tokens).all()
  assert (got.segment_offsets == whole.segment_offsets).all()


def test_cli_prepares_with_each_tokenizer_format(data, tmp_path, capsys):
  """`plmjax data prepare` end to end with a sentencepiece .model, a tokenizer.json and a
  WordPiece vocab.txt: the summary line, the progress bar, and the tokens equal to
  tokenizing the raw files with the same tokenizer (any worker count)."""
  from tokenizers import BertWordPieceTokenizer
  from plmjax.export.hf_tokenizer import sentencepiece_to_tokenizer
  sentencepiece_to_tokenizer(data["bert"].path, "bert").save(str(tmp_path / "tokenizer.json"))
  wordpiece = BertWordPieceTokenizer(lowercase=True)
  wordpiece.train_from_iterator(synthetic.synthetic_texts(70, seed=11), vocab_size=300)
  wordpiece.save_model(str(tmp_path))
  cases = [(data["bert"].path, (1,)), (str(tmp_path / "tokenizer.json"), (1,)),
           (str(tmp_path / "vocab.txt"), (1, 2))]
  for path, worker_counts in cases:
    tokenizer = tk.load_tokenizer(path)
    whole = corpus_lib.tokenize_documents(sources.read_documents(data["raw"]), tokenizer)
    outs = []
    for workers in worker_counts:
      out = str(tmp_path / f"{os.path.basename(path)}-{workers}")
      assert cli.main(["data", "prepare", "--input", data["raw"], "--tokenizer", path,
                       "--out", out, "--workers", str(workers), "--shard-size", "4KB"]) == 0
      captured = capsys.readouterr()
      assert f"plmjax: prepared {out}: {whole.num_documents} documents" in captured.out
      assert f"{whole.num_tokens} tokens" in captured.out and "next: plmjax pretrain" in captured.out
      assert "B/s" in captured.err  # the progress bar: text bytes per second
      got = prepared.open_corpus(out, tokenizer, model_vocab_size=tokenizer.vocab_size)
      assert (got.tokens[:] == whole.tokens).all()
      assert (got.segment_offsets == whole.segment_offsets).all()
      outs.append(_files(out))
    assert all(files == outs[0] for files in outs)


def test_eval_split_reads_a_prepared_directory(data):
  c = _config(data, "bert", data["raw"], eval=data["bert_dir"])
  raw = _config(data, "bert", data["raw"], eval=data["raw"])
  got = _take(pipeline.make_pretrain_iterator(c, data["bert"], split="eval", batch_size=4), 3)
  want = _take(pipeline.make_pretrain_iterator(raw, data["bert"], split="eval", batch_size=4), 3)
  assert _same(got, want)
