"""The fine-tuning configs against the real tfds schemas of their datasets.

Nothing can be downloaded in tests, so each dataset is prepared from tiny files in the
original distribution formats (GLUE .tsv, CoNLL-2003 .txt, SQuAD .json) by tfds's own
builder (tfds.text.Glue, Conll2003, the squad Builder): a subclass only swaps the
download manager for one that returns those local files. Feature names, ClassLabel
names, nesting and split names therefore come from the installed tfds code, and the
prepared ArrayRecord files are read back by name through `tfds.data_source` with the
registered builders, exactly as `plmjax finetune` reads a real prepared copy.
"""

import json
import os
import pathlib

from etils import epath  # a tfds dependency
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.squad import squad_dataset_builder
from tensorflow_datasets.text import conll2003, glue

from plmjax import cli
from plmjax import config as config_lib
from plmjax.data.tokenizer import load_tokenizer
from plmjax.errors import DataError
from plmjax.finetune import data, features, finetune, tasks
from tests.finetune_helpers import make_init_workdir, words, write_jsonl

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "finetune"
W = words(40)
POSITIVE = W[0]  # sst2 stand-in: a sentence with this word is 'positive'


class _LocalDownloads:
  """Stands in for tfds's DownloadManager: each URL -> a local file of the same name
  (an archive 'X.zip' -> the folder 'X', as if extracted)."""

  def __init__(self, root):
    self.root = epath.Path(root)

  def _local(self, url: str):
    name = os.path.basename(url.split("?")[0])
    return self.root / (name[:-len(".zip")] if name.endswith(".zip") else name)

  def download_and_extract(self, urls):
    if isinstance(urls, dict):
      return {k: self._local(u) for k, u in urls.items()}
    return self._local(urls)

  download = download_and_extract


def _local_builder(base):
  """`base` (a registered tfds builder) fed from local files; not registered itself,
  and named as `base` so that it prepares DATA_DIR/NAME/CONFIG/VERSION."""

  class Local(base, skip_registration=True):
    name = base.name
    pkg_dir_path = base._get_pkg_dir_path()  # metadata (README, citations) of `base`
    files = ""

    def _split_generators(self, dl_manager):
      del dl_manager
      return super()._split_generators(_LocalDownloads(self.files))

  return Local


def _prepare(base, config, files, data_dir):
  builder = _local_builder(base)(config=config, data_dir=data_dir,
                                 file_format="array_record")
  builder.files = str(files)
  builder.download_and_prepare()
  return builder.info


# ---- tiny files in the original formats ---------------------------------------------------

def _sentence(rng, n=5):
  return " ".join(rng.choice(W[1:], size=n))


def _tsv(path, header, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join("\t".join(map(str, r)) for r in [header] + rows) + "\n")


def _sst2_rows(n, seed):
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    text = _sentence(rng).split()
    if i % 2:
      text[rng.integers(len(text))] = POSITIVE
    rows.append((" ".join(text), i % 2))
  return rows


def _write_glue(root):
  sst = root / "SST-2" / "SST-2"
  _tsv(sst / "train.tsv", ("sentence", "label"), _sst2_rows(40, 0))
  _tsv(sst / "dev.tsv", ("sentence", "label"), _sst2_rows(16, 1))
  _tsv(sst / "test.tsv", ("index", "sentence"), [(i, s) for i, (s, _) in
                                                  enumerate(_sst2_rows(4, 2))])
  rng = np.random.default_rng(3)
  mnli = root / "MNLI" / "MNLI"
  head = ("index", "promptID", "pairID", "genre", "sentence1", "sentence2", "label1",
          "gold_label")
  gold = ("neutral", "contradiction", "entailment")
  for name, n in [("train", 6), ("dev_matched", 4), ("dev_mismatched", 3)]:
    _tsv(mnli / f"{name}.tsv", head, [(i, i, f"{i}n", "fiction", _sentence(rng), _sentence(rng),
                                       gold[i % 3], gold[i % 3]) for i in range(n)])
  for name in ("test_matched", "test_mismatched"):
    _tsv(mnli / f"{name}.tsv", head[:6], [(i, i, f"{i}n", "fiction", _sentence(rng),
                                           _sentence(rng)) for i in range(2)])
  sts = root / "STS-B" / "STS-B"
  head = ("index", "genre", "filename", "year", "old_index", "source1", "source2",
          "sentence1", "sentence2", "score")
  for name, n in [("train", 6), ("dev", 4)]:
    _tsv(sts / f"{name}.tsv", head, [(i, "main-news", "x", "2012", i, "none", "none",
                                      _sentence(rng), _sentence(rng), f"{i * 0.75:.3f}")
                                     for i in range(n)])
  _tsv(sts / "test.tsv", head[:-1], [(0, "main-news", "x", "2012", 0, "none", "none",
                                      _sentence(rng), _sentence(rng))])


CONLL_SENTENCES = [  # (word, POS, chunk, NER) per line, as in the CoNLL-2003 files
    [(W[1], "NNP", "B-NP", "B-ORG"), (W[2], "VBZ", "B-VP", "O"), (W[3], "NNP", "B-NP", "B-PER"),
     (W[4], "NNP", "I-NP", "I-PER"), (".", ".", "O", "O")],
    [(W[5], "NNP", "B-NP", "B-LOC"), (W[6], "VBD", "B-VP", "O"), (W[7], "JJ", "B-NP", "B-MISC"),
     (W[8], "NN", "I-NP", "O")],
    [(W[9], "NNP", "B-NP", "B-ORG"), (W[10], "NNP", "I-NP", "I-ORG")],
]


def _write_conll(root):
  folder = root / "conll2003"
  folder.mkdir(parents=True)
  lines = ["-DOCSTART- -X- -X- O", ""]
  for sentence in CONLL_SENTENCES:
    lines += [" ".join(t) for t in sentence] + [""]
  # The published files end with a blank line: the tfds generator then yields one
  # empty sentence at the end of each split (tfds lists 14,042 train sentences).
  for name in ("train.txt", "valid.txt", "test.txt"):
    (folder / name).write_text("\n".join(lines) + "\n")


def _squad_json(path, n, seed, answers_per_question):
  rng = np.random.default_rng(seed)
  paragraphs = []
  for i in range(n):
    context = f"{_sentence(rng, 8)} . {_sentence(rng, 7)} ."
    answer = " ".join(context.split()[3 + i % 3:5 + i % 3])
    start = context.index(" " + answer + " ") + 1
    qas = [{"id": f"q{seed}-{i}", "question": f"{_sentence(rng, 4)} ?",
            "answers": [{"text": answer, "answer_start": start}] * answers_per_question}]
    paragraphs.append({"context": context, "qas": qas})
  path.write_text(json.dumps({"version": "1.1", "data": [{"title": "T",
                                                           "paragraphs": paragraphs}]}))


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
  """DATA_DIR with glue/{sst2,mnli,stsb}, conll2003 and squad/v1.1 prepared."""
  tfds.disable_progress_bar()
  root = tmp_path_factory.mktemp("tfds_stand_ins")
  files, data_dir = root / "files", str(root / "tfds")
  files.mkdir()
  _write_glue(files)
  _write_conll(files)
  _squad_json(files / "train-v1.1.json", 5, 0, 1)
  _squad_json(files / "dev-v1.1.json", 3, 1, 3)  # dev: several reference answers each
  infos = {f"glue/{c}": _prepare(glue.Glue, c, files, data_dir)
           for c in ("sst2", "mnli", "stsb")}
  infos["conll2003"] = _prepare(conll2003.Conll2003, "conll2003", files, data_dir)
  infos["squad/v1.1"] = _prepare(squad_dataset_builder.Builder, "v1.1", files, data_dir)
  return data_dir, infos


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
  return make_init_workdir(tmp_path_factory.mktemp("pretrained"))


def test_stand_ins_have_the_published_schemas(stand_ins):
  """What the tfds catalog lists for each dataset (features, label names, splits)."""
  _, infos = stand_ins
  want = {
      "glue/sst2": ({"idx", "label", "sentence"}, ("negative", "positive"),
                    {"train", "validation", "test"}),
      "glue/mnli": ({"idx", "label", "premise", "hypothesis"},
                    ("entailment", "neutral", "contradiction"),
                    {"train", "validation_matched", "validation_mismatched", "test_matched",
                     "test_mismatched"}),
      "glue/stsb": ({"idx", "label", "sentence1", "sentence2"}, None,
                    {"train", "validation", "test"}),
      "conll2003": ({"tokens", "pos", "chunks", "ner"}, None, {"train", "dev", "test"}),
      "squad/v1.1": ({"id", "title", "context", "question", "answers"}, None,
                     {"train", "validation"}),
  }
  for name, (keys, label_names, splits) in want.items():
    info = infos[name]
    assert set(info.features) == keys, name
    assert set(info.splits) == splits, name
    if label_names:
      assert tuple(info.features["label"].names) == label_names
  assert infos["glue/stsb"].features["label"].np_dtype == np.float32
  assert tuple(infos["conll2003"].features["ner"].feature.names) == (
      "O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
  assert set(infos["squad/v1.1"].features["answers"].feature) == {"text", "answer_start"}
  # Read back through tfds's own registered builders, not the local-file subclasses.
  source = tfds.data_source("glue/mnli", split="validation_matched", data_dir=stand_ins[0])
  assert type(source.dataset_info.features["label"]).__name__ == "ClassLabel"
  assert tfds.builder("glue/sst2", data_dir=stand_ins[0]).__class__ is glue.Glue


def _config(name, init, data_dir):
  config = config_lib.load_config_file(str(CONFIGS / f"{name}.py"))
  return finetune.prepare_config(config, init, [f"--config.data.tfds_data_dir={data_dir}"])


def _load(config, tokenizer, key):
  records = data.read_records(config.data[key], tfds_data_dir=config.data.tfds_data_dir,
                              key=f"config.data.{key}")
  return records, features.featurize(config.task, tokenizer, records, config.data.max_seq_len)


@pytest.mark.parametrize("name", ["sst2", "mnli", "stsb"])
def test_glue_configs_read_labelled_features(stand_ins, init_dir, name):
  config = _config(name, init_dir, stand_ins[0])
  tokenizer = load_tokenizer(init_dir + "/tokenizer")
  labels = list(config.task.labels)
  for key, n in [("train", {"sst2": 40, "mnli": 6, "stsb": 6}[name]),
                 ("eval", {"sst2": 16, "mnli": 4, "stsb": 4}[name])]:
    records, feats = _load(config, tokenizer, key)
    assert len(records) == len(feats.examples) == n
    for r, gold in zip(records, feats.examples):
      if name == "sst2":  # the ClassLabel index read back by name
        want = "positive" if POSITIVE in r.fields["sentence"].split() else "negative"
        assert labels[gold] == want
      elif name == "mnli":
        assert labels[gold] == ("neutral", "contradiction", "entailment")[r.fields["idx"] % 3]
      else:
        assert gold == pytest.approx(r.fields["idx"] * 0.75)
    ids = feats.arrays["input_ids"]
    assert ids.shape == (n, config.data.max_seq_len) and (ids[:, 0] == tokenizer.cls_id).all()
    pairs = feats.arrays["token_type_ids"].max(axis=1)
    assert (pairs == (0 if name == "sst2" else 1)).all()  # sentence pairs use segment B
  if name == "mnli":  # GLUE's own column names are not the tfds feature names
    config.task.text_field = "sentence1"
    with pytest.raises(DataError, match=r"no field 'sentence1' \(fields: hypothesis, idx, "
                       r"label, premise\)"):
      _load(config, tokenizer, "eval")


LOCAL_ROWS = {  # the README's field names for local files, per shipped config
    "sst2": [dict(text="ka lo mi", label="positive"), dict(text="ne ru", label=0)],
    "mnli": [dict(text="ka lo", text_b="mi ne", label="neutral"),
             dict(text="ru", text_b="sa ti", label=2)],
    "stsb": [dict(text="ka lo", text_b="mi ne", label=4.5), dict(text="ru", text_b="sa", label=0)],
    "conll2003": [dict(tokens=["ka", "lo"], tags=["B-PER", "O"])],
    "squad": [dict(question="ka", context="lo mi ne",
                   answers={"text": ["mi"], "answer_start": [3]})],
}


@pytest.mark.parametrize("name", list(LOCAL_ROWS))
def test_shipped_configs_read_local_files_with_the_documented_fields(init_dir, tmp_path, name):
  rows = LOCAL_ROWS[name]
  path = write_jsonl(tmp_path / "train.jsonl", rows)
  config = config_lib.load_config_file(str(CONFIGS / f"{name}.py"))
  finetune.prepare_config(config, init_dir, [f"--config.data.train={path}"])
  tokenizer = load_tokenizer(init_dir + "/tokenizer")
  feats = finetune.load_split(config, tokenizer, "train")
  a = feats.arrays
  if name in ("sst2", "mnli", "stsb"):
    labels = list(config.task.labels)
    want = ([r["label"] if isinstance(r["label"], (int, float)) else labels.index(r["label"])
             for r in rows])
    assert a["labels"].tolist() == want
    for i, r in enumerate(rows):  # [CLS] text [SEP] (text_b [SEP])
      ids = [tokenizer.cls_id] + tokenizer.encode(r["text"]) + [tokenizer.sep_id]
      if name != "sst2":
        ids += tokenizer.encode(r["text_b"]) + [tokenizer.sep_id]
      assert a["input_ids"][i, :len(ids)].tolist() == ids
      assert a["attention_mask"][i].sum() == len(ids)
    assert (a["token_type_ids"].max(axis=1) == (0 if name == "sst2" else 1)).all()
  elif name == "conll2003":
    assert [list(config.task.labels)[t] for t in feats.examples[0]["tags"]] == ["B-PER", "O"]
  else:
    assert a["start_positions"][0] > 0 and feats.examples[0]["answers"] == ["mi"]


def test_conll2003_config_tags_every_word(stand_ins, init_dir):
  config = _config("conll2003", init_dir, stand_ins[0])
  assert config.data.eval == "tfds:conll2003:dev"
  tokenizer = load_tokenizer(init_dir + "/tokenizer")
  labels = list(config.task.labels)
  by_words = {tuple(t[0] for t in s): s for s in CONLL_SENTENCES + [[]]}
  for key in ("train", "eval"):
    records, feats = _load(config, tokenizer, key)
    # Three sentences, and the empty one tfds makes of the file's last blank line
    # (tfds stores examples shuffled by key, so they are matched by their words).
    assert sorted(len(r.fields["tokens"]) for r in records) == [0, 2, 4, 5]
    for ex, row in zip(feats.examples, feats.arrays["labels"]):
      sentence = by_words[tuple(ex["words"])]
      assert [labels[t] for t in ex["tags"]] == [t[3] for t in sentence]
      assert len(ex["first"]) == len(sentence)  # every word fits and carries its tag
      assert [labels[t] for t in row[ex["first"]]] == [t[3] for t in sentence]
      assert (row >= 0).sum() == len(sentence)
  # The task metrics take the empty sentence too (it is scored with no entities).
  logits = np.random.default_rng(0).normal(size=feats.arrays["labels"].shape + (len(labels),))
  scores = tasks.compute_metrics(config.task, feats, {"logits": logits})
  assert all(np.isfinite(scores[k]) for k in ("precision", "recall", "f1", "accuracy"))


def test_squad_config_finds_the_answers(stand_ins, init_dir):
  config = _config("squad", init_dir, stand_ins[0])
  tokenizer = load_tokenizer(init_dir + "/tokenizer")
  for key, n, per_question in [("train", 5, 1), ("eval", 3, 3)]:
    records, feats = _load(config, tokenizer, key)
    assert len(records) == n and feats.skipped == 0 and len(feats.arrays["input_ids"]) == n
    gold = [r.fields["answers"]["text"][0] for r in records]
    assert all(len(r.fields["answers"]["text"]) == per_question for r in records)
    assert [ex["answers"] for ex in feats.examples] == [[g] * per_question for g in gold]
    # Logits that pick the labelled start/end positions decode back to the answer text.
    start = np.full(feats.arrays["input_ids"].shape, -10.0)
    end = start.copy()
    rows = np.arange(n)
    start[rows, feats.arrays["start_positions"]] = 10.0
    end[rows, feats.arrays["end_positions"]] = 10.0
    assert (feats.arrays["start_positions"] > 0).all()
    assert features.qa_answers(feats, start, end, max_answer_len=config.task.max_answer_len) == gold


def test_sst2_finetune_cli_on_tfds(stand_ins, init_dir, tmp_path):
  workdir = tmp_path / "sst2"
  code = cli.main(["finetune", "--config", str(CONFIGS / "sst2.py"), "--init", init_dir,
                   "--workdir", str(workdir), f"--config.data.tfds_data_dir={stand_ins[0]}",
                   "--config.data.max_seq_len=32", "--config.train.batch_size=8",
                   "--config.train.epochs=2", "--config.train.learning_rate=1e-3",
                   "--config.checkpoint.async_save=false"])
  assert code == 0
  results = json.loads((workdir / "eval_results.json").read_text())
  assert results["step"] == 10  # 40 rows / batch 8 * 2 epochs
  assert 0.0 <= results["accuracy"] <= 1.0 and np.isfinite(results["loss"])
  evals = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [e["step"] for e in evals if e.get("split") == "eval"] == [5, 10]
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["data"]["train"] == "tfds:glue/sst2:train"
  assert saved["task"]["labels"] == ["negative", "positive"]
