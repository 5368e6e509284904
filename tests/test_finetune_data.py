"""Readers, featurisation (pairs, first-sub-token tags, QA windows) and batch iterators."""

import numpy as np
import pytest

from plmjax.data.tokenizer import load_tokenizer

from plmjax.data.tokenizer_train import train_tokenizer
from plmjax.errors import DataError
from plmjax.finetune import data, features
from plmjax.finetune.tasks import finetune_config
from finetune_helpers import words, write_jsonl
from synthetic import synthetic_texts


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer"
  return load_tokenizer(train_tokenizer(synthetic_texts(60, seed=1), 200, "unigram", str(path),
                                        kind="bert"))


def task(**kw):
  return finetune_config(**kw).task


def test_readers_keep_file_and_line(tmp_path):
  (tmp_path / "a.tsv").write_text('sentence\tlabel\nit "works\t1\n\nfine\t0\n')
  recs = data.read_records(str(tmp_path / "a.tsv"))
  assert [r.fields for r in recs] == [{"sentence": 'it "works', "label": "1"},
                                      {"sentence": "fine", "label": "0"}]
  assert recs[1].where.endswith("a.tsv:4")
  (tmp_path / "b.csv").write_text('text,label\n"a, b",pos\n')
  assert data.read_records(str(tmp_path / "b.csv"))[0].fields == {"text": "a, b", "label": "pos"}
  (tmp_path / "c.jsonl").write_text('{"text": "x"}\n{"text": \n')
  with pytest.raises(DataError, match=r"c\.jsonl:2: not valid JSON"):
    data.read_records(str(tmp_path / "c.jsonl"))
  with pytest.raises(DataError, match="no such file"):
    data.read_records(str(tmp_path / "missing.jsonl"))
  rec = data.read_records(str(tmp_path / "b.csv"))[0]
  with pytest.raises(DataError, match=r"b\.csv:2: no field 'sentence' \(fields: label, text\)"):
    rec.get("sentence", "config.task.text_field")


def test_missing_tfds_dataset_names_the_key_and_the_fix(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(DataError, match=r"^config\.data\.eval='tfds:no_such_dataset_xyz:train': "
                     r"tfds dataset 'no_such_dataset_xyz' not found in data_dir=.*; prepare it "
                     r"with tfds or set config\.data\.tfds_data_dir"):
    data.read_records("tfds:no_such_dataset_xyz:train", tfds_data_dir=str(tmp_path),
                      key="config.data.eval")


def test_labels_by_name_or_index_and_bad_label():
  labels = ["neg", "pos"]
  assert features.label_index("pos", labels, "f:1") == 1
  assert features.label_index(0, labels, "f:1") == 0
  assert features.label_index("1", labels, "f:1") == 1  # GLUE tsv files hold indices
  assert features.label_index(1, labels, "f:1", class_names=["pos", "neg"]) == 0  # tfds names
  for bad in ("maybe", 2, -1, True, 0.5):
    with pytest.raises(DataError, match=r"f:1: label .* is not one of config.task.labels"):
      features.label_index(bad, labels, "f:1")


def test_pair_layout_and_truncation(tok):
  recs = [data.Record(dict(text=" ".join(words(30)), text_b="ka lo", label="1"), "x:1")]
  feats = features.featurize(task(text_b_field="text_b"), tok, recs, 16)
  ids, types = feats.arrays["input_ids"][0], feats.arrays["token_type_ids"][0]
  b = tok.encode("ka lo")
  assert ids[0] == tok.cls_id and feats.arrays["attention_mask"][0].sum() == 16
  # Longest-first: the short second segment survives whole, the first is cut.
  assert list(ids[16 - len(b) - 1:]) == b + [tok.sep_id]
  assert ids[16 - len(b) - 2] == tok.sep_id
  assert list(types) == [0] * (16 - len(b) - 1) + [1] * (len(b) + 1)
  assert feats.arrays["labels"].tolist() == [1]


def test_tags_on_first_sub_token_only(tok):
  ws = ["griho", "dane", "hozorne"]  # 2, 1 and 3 sub-tokens
  pieces = [len(tok.encode(w)) for w in ws]
  assert pieces[0] > 1 and pieces[2] > 1
  t = task(type="tagging", labels=("O", "B-PER", "I-PER"), text_field="tokens", label_field="tags")
  recs = [data.Record(dict(tokens=ws, tags=["B-PER", "I-PER", "O"]), "x:1")]
  feats = features.featurize(t, tok, recs, 16)
  labels = feats.arrays["labels"][0]
  first = [1, 1 + pieces[0], 1 + pieces[0] + pieces[1]]
  assert labels[first].tolist() == [1, 2, 0]
  assert (np.delete(labels, first) == features.IGNORE).all()
  # Predictions map back to words; words cut off by the length limit are 'O'.
  logits = np.zeros((1, 16, 3))
  logits[0, first, [1, 2, 1]] = 5.0
  assert features.tag_predictions(feats, logits, list(t.labels)) == [["B-PER", "I-PER", "B-PER"]]
  short = features.featurize(t, tok, recs, 4)
  assert short.examples[0]["first"] == [1] and features.tag_predictions(
      short, np.zeros((1, 4, 3)), list(t.labels)) == [["O", "O", "O"]]
  bad = [data.Record(dict(tokens=ws, tags=["B-PER", "O"]), "y.jsonl:7")]
  with pytest.raises(DataError, match=r"y\.jsonl:7: .*one tag per word"):
    features.featurize(t, tok, bad, 16)


def qa_task(**kw):
  return task(type="qa", labels=(), text_field="question", text_b_field="context",
              label_field="answers", **kw)


def test_qa_windows_recover_answer_across_a_window_boundary(tok):
  ws = words(40)[:30]
  context = " ".join(ws)
  t = qa_task(doc_stride=4, max_query_len=4)
  found = None
  for w in range(len(ws) - 1):  # an answer whose two words straddle window 0's end
    text = f"{ws[w]} {ws[w + 1]}"
    rec = data.Record(dict(question="ka lo", context=context,
                           answers={"text": [text], "answer_start": [context.index(text)]}), "q:1")
    feats = features.featurize(t, tok, [rec], 24)
    tw = feats.examples[0]["token_word"][0]
    if w in tw and w + 1 not in tw:
      found = (feats, text, w)
      break
  assert found, "no answer straddles the first window"
  feats, text, w = found
  ex = feats.examples[0]
  starts, ends = feats.arrays["start_positions"], feats.arrays["end_positions"]
  assert len(ex["features"]) > 2
  assert starts[0] == ends[0] == 0  # window 0 holds only part of it: target [CLS]
  inside = [f for f in ex["features"] if starts[f] > 0]
  assert inside
  for f in inside:  # every window with a target points at exactly the answer
    tw = ex["token_word"][ex["features"].index(f)]
    assert (tw[starts[f]], tw[ends[f]]) == (w, w + 1)
    assert tw[starts[f] - 1] != w and tw[ends[f] + 1] != w + 1  # whole words
  # Perfect logits in one window recover the answer text from the context.
  n = len(starts)
  start_logits, end_logits = np.zeros((n, 24)), np.zeros((n, 24))
  f = inside[-1]
  start_logits[f, starts[f]] = end_logits[f, ends[f]] = 10.0
  for g in inside:
    if ex["max_context"][ex["features"].index(g)][starts[g]]:
      start_logits[g, starts[g]] = end_logits[g, ends[g]] = 10.0
  assert features.qa_answers(feats, start_logits, end_logits) == [text]


def test_qa_answer_not_in_context_is_an_error(tok, tmp_path):
  path = write_jsonl(tmp_path / "qa.jsonl", [
      dict(question="a", context="ka lo mi", answers={"text": ["lo"], "answer_start": [3]}),
      dict(question="a", context="ka lo mi", answers={"text": ["ne"], "answer_start": [0]})])
  with pytest.raises(DataError, match=r"qa\.jsonl:2: answer 'ne' is not in its context"):
    features.featurize(qa_task(), tok, data.read_records(path), 24)
  path = write_jsonl(tmp_path / "qa2.jsonl", [dict(question="a", context="ka lo", answers="mi")])
  with pytest.raises(DataError, match=r"qa2\.jsonl:1: answer 'mi' is not in its context"):
    features.featurize(qa_task(), tok, data.read_records(path), 24)


def test_batch_iterator_epochs_resume_and_process_slices():
  arrays = {"x": np.arange(10), "weights": np.ones(10, np.float32)}
  it = data.BatchIterator(arrays, 5, seed=1)
  first_two_epochs = [next(it)["x"] for _ in range(4)]
  assert sorted(np.concatenate(first_two_epochs[:2])) == list(range(10))
  assert sorted(np.concatenate(first_two_epochs[2:])) == list(range(10))
  assert not np.array_equal(first_two_epochs[0], first_two_epochs[2])  # reshuffled
  resumed = data.BatchIterator(arrays, 5, seed=1)
  resumed.set_state({"batch": 3})
  assert np.array_equal(next(resumed)["x"], first_two_epochs[3])
  halves = [next(data.BatchIterator(arrays, 4, seed=1, process_index=p, process_count=2))["x"]
            for p in (0, 1)]
  full = next(data.BatchIterator(arrays, 4, seed=1))["x"]
  assert np.array_equal(np.concatenate(halves), full)
  batches = list(data.eval_batches(arrays, 4))
  assert [b["weights"].tolist() for b in batches][-1] == [1, 1, 0, 0]
  assert np.concatenate([b["x"] for b in batches])[:10].tolist() == list(range(10))


def test_field_names_one_rule():
  local = [data.Record({}, "f.jsonl:1")]
  tfds = [data.Record({}, "tfds:glue/mnli:train[0]")]

  def names(t, recs):
    r = data.task_fields(t, recs)
    return r.text_field, r.text_b_field, r.label_field

  # Local files: the documented names of the task type; tfds: the config's tfds_fields.
  mnli = task(pairs=True, tfds_fields=dict(text="premise", text_b="hypothesis"))
  assert names(mnli, local) == ("text", "text_b", "label")
  assert names(mnli, tfds) == ("premise", "hypothesis", "label")
  sst2 = task(tfds_fields=dict(text="sentence"))
  assert names(sst2, local) == ("text", "", "label")  # one text: no pairs
  assert names(sst2, tfds) == ("sentence", "", "label")
  # task.*_field override both; setting text_b_field makes a pair task.
  both = task(text_field="a", text_b_field="b", label_field="y", tfds_fields=dict(text="t"))
  assert names(both, local) == names(both, tfds) == ("a", "b", "y")
  assert names(task(type="tagging", tfds_fields=dict(label="ner")), tfds) == ("tokens", "", "ner")
  assert names(task(type="tagging"), local) == ("tokens", "", "tags")
  assert names(task(type="qa"), local) == ("question", "context", "answers")
  assert names(task(type="completion"), local) == ("prompt", "", "completion")
  assert mnli.text_field == ""  # the config itself is not changed


def test_a_local_pair_file_with_the_documented_fields(tok, tmp_path):
  path = write_jsonl(tmp_path / "pairs.jsonl", [dict(text="ka lo", text_b="mi", label="1")])
  feats = features.featurize(task(pairs=True), tok, data.read_records(path), 16)
  ids, types = feats.arrays["input_ids"][0], feats.arrays["token_type_ids"][0]
  a, b = tok.encode("ka lo"), tok.encode("mi")
  assert ids[:len(a) + len(b) + 3].tolist() == ([tok.cls_id] + a + [tok.sep_id] + b
                                                + [tok.sep_id])
  assert types.sum() == len(b) + 1 and feats.arrays["labels"].tolist() == [1]
