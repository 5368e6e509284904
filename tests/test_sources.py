"""Text sources: file formats, sentence splitting, tfds, python-docs, sharding, errors."""

import gzip
import json
import subprocess
import sys

import pytest

from plmjax.data import python_docs, sources
from plmjax.errors import ConfigError, DataError

import synthetic


def _shards_cover(spec, n, **kwargs):
  everything = sources.read_documents(spec, **kwargs)
  shards = [list(sources.read_documents(spec, process_index=i, process_count=n, **kwargs))
            for i in range(n)]
  return everything, shards


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
  (tmp_path / "a.txt").write_text("First doc line one.\nLine two.\n\n\nSecond doc.\n")
  (tmp_path / "b.txt").write_text("\nThird doc.\n")
  docs = sources.read_documents(str(tmp_path / "*.txt"))
  assert docs == [["First doc line one.", "Line two."], ["Second doc."], ["Third doc."]]


def test_jsonl_and_gzip(tmp_path):
  lines = [{"text": "Para one.\nPara two.", "title": "x"}, {"text": "Other."}]
  body = "".join(json.dumps(r) + "\n" for r in lines)
  (tmp_path / "a.jsonl").write_text(body)
  with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
    f.write(body)
  docs = sources.read_documents(str(tmp_path / "*"))
  assert docs == [["Para one.", "Para two."], ["Other."]] * 2


def test_long_lines_split_at_sentence_ends():
  line = " ".join(f"Sentence number {i} is here and it goes on for a while." for i in range(8))
  parts = sources.split_sentences(line)
  assert len(parts) == 8 and all(p.endswith("while.") for p in parts)
  assert " ".join(parts) == line
  assert sources.split_sentences("Short one. Stays whole.") == ["Short one. Stays whole."]


def test_real_text(wiki_sample):
  docs = sources.read_documents(str(wiki_sample))
  assert len(docs) == 95
  segments = [s for d in docs for s in d]
  assert all(segments) and max(len(s) for s in segments) < 2000
  assert docs[0][0].startswith("Anarchism")


@pytest.mark.parametrize("n", [2, 3])
def test_file_shards_are_disjoint_and_cover(tmp_path, n):
  texts = [f"Document {i}.\nIt has text {i}." for i in range(10)]
  synthetic.write_corpus(str(tmp_path / "a.jsonl"), texts[:7])
  synthetic.write_corpus(str(tmp_path / "b.txt"), texts[7:])
  everything, shards = _shards_cover(str(tmp_path / "*"), n)
  assert len(everything) == 10
  flat = [tuple(d) for shard in shards for d in shard]
  assert sorted(flat) == sorted(tuple(d) for d in everything)  # covering
  assert len(set(flat)) == len(flat)  # disjoint
  assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_many_files_are_split_by_size(tmp_path):
  for i in range(12):  # uneven sizes
    synthetic.write_corpus(str(tmp_path / f"part{i:02d}.txt"),
                           [f"File {i} doc {j}." for j in range(1 + 3 * (i % 4))])
  owners = sources._file_owners(sorted(map(str, tmp_path.glob("*.txt"))), 3)
  assert owners == sorted(owners) and set(owners) == {0, 1, 2}
  everything, shards = _shards_cover(str(tmp_path / "*.txt"), 3)
  flat = [d[0] for shard in shards for d in shard]
  assert sorted(flat) == sorted(d[0] for d in everything) and len(set(flat)) == len(flat)
  assert all(abs(len(s) - len(flat) / 3) < len(flat) / 6 for s in shards)  # balanced
  assert {d[0].split()[1] for d in shards[0]}.isdisjoint({d[0].split()[1] for d in shards[1]})


def test_bad_inputs_name_the_file_or_key(tmp_path):
  with pytest.raises(DataError, match=r"config.data.train='.*nothing\*.txt' matches no files"):
    sources.read_documents(str(tmp_path / "nothing*.txt"), key="config.data.train")
  (tmp_path / "empty.txt").write_text("\n\n")
  with pytest.raises(DataError, match="empty.txt holds no text"):
    sources.read_documents(str(tmp_path / "empty.txt"))
  (tmp_path / "no_text.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
  with pytest.raises(DataError, match="no_text.jsonl:2: .*'text'"):
    sources.read_documents(str(tmp_path / "no_text.jsonl"))
  (tmp_path / "broken.jsonl").write_text('{"text": \n')
  with pytest.raises(DataError, match="broken.jsonl:1: not valid JSON"):
    sources.read_documents(str(tmp_path / "broken.jsonl"))
  (tmp_path / "data.csv").write_text("a,b\n")
  with pytest.raises(DataError, match="data.csv: unsupported file type"):
    sources.read_documents(str(tmp_path / "data.csv"))
  with pytest.raises(ConfigError, match="config.data.eval is empty"):
    sources.read_documents("", key="config.data.eval")
  with pytest.raises(DataError, match="builtin:nope"):
    sources.read_documents("builtin:nope")
  with pytest.raises(ConfigError, match="tfds:NAME"):
    sources.read_documents("tfds:wikipedia")
  with pytest.raises(ConfigError, match="process_index=2"):
    sources.read_documents(str(tmp_path / "*.txt"), process_index=2, process_count=2)


def test_tfds_through_data_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class PlmjaxTinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text(), "title": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(9), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"text": f"Doc {i} starts.\nDoc {i} ends.", "title": f"t{i}"}

  data_dir = str(tmp_path / "tfds")
  PlmjaxTinyText(data_dir=data_dir, file_format="array_record").download_and_prepare()
  spec = "tfds:plmjax_tiny_text:train"
  everything, shards = _shards_cover(spec, 2, tfds_data_dir=data_dir)
  docs = list(everything)
  assert len(docs) == len(everything) == 9
  assert sorted(d[0] for d in docs) == sorted(f"Doc {i} starts." for i in range(9))
  flat = [tuple(d) for s in shards for d in s]
  assert sorted(flat) == sorted(tuple(d) for d in docs) and len(set(flat)) == 9
  assert len(sources.read_documents("tfds:plmjax_tiny_text:train[:3]",
                                    tfds_data_dir=data_dir)) == 3
  versioned = sources.read_documents("tfds:plmjax_tiny_text:1.0.0:train[:3]",
                                     tfds_data_dir=data_dir)
  assert list(versioned) == list(sources.read_documents("tfds:plmjax_tiny_text:train[:3]",
                                                        tfds_data_dir=data_dir))
  with pytest.raises(DataError, match="'no_such_dataset_xyz' not found"):
    sources.read_documents("tfds:no_such_dataset_xyz:train", tfds_data_dir=data_dir,
                           key="config.data.train")
  with pytest.raises(DataError, match="split 'validation'"):
    sources.read_documents("tfds:plmjax_tiny_text:validation", tfds_data_dir=data_dir)


def test_builtin_python_docs():
  train = sources.read_documents("builtin:python-docs")
  held_out = sources.read_documents("builtin:python-docs:eval")
  assert train is not held_out and 400 < len(train) and 0.02 < len(held_out) / len(train) < 0.1
  chars = sum(len(s) for d in train + held_out for s in d)
  assert 1_000_000 < chars <= python_docs.MAX_CHARS + 200_000
  assert not {tuple(d) for d in train} & {tuple(d) for d in held_out}
  assert any("assert" in s for s in train[0] + held_out[0])
  assert sources.read_documents("builtin:python-docs:train") == train
  # Deterministic, and sharded like every other source.
  assert python_docs.read("builtin:python-docs") == train
  shard = sources.read_documents("builtin:python-docs", process_index=1, process_count=2)
  assert shard == train[1::2]


def test_python_docs_does_not_import_sources():
  """Data flows one way: sources reads python_docs, never the reverse."""
  code = ("import sys; from plmjax.data import python_docs; "
          "python_docs.read('builtin:python-docs:eval'); "
          "print('plmjax.data.sources' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
