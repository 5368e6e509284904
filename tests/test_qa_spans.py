"""Exact QA spans: sub-word targets and answers cut out of the context by character offsets."""

import pathlib

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from plmjax.data.tokenizer import load_tokenizer

from plmjax.data.tokenizer_train import train_tokenizer
from plmjax.export.hf_tokenizer import sentencepiece_to_tokenizer
from plmjax.finetune import data, features, metrics
from plmjax.finetune.tasks import finetune_config

NAMES = ("Greta", "Oskar", "Zoë", "Marta", "Ivo", "Lene")
THINGS = ("boat", "house", "café", "garden", "letters")
# (context, answer, answer_start): answers inside possessives, brackets, hyphenated words.
CASES = [
    ("Greta's boat is red.", "Greta", 0),
    ("They sailed on Greta's boat.", "Greta", 15),
    ("The painter Ivo Lund (1895-1943) lived here.", "1895", 22),
    ("The painter Ivo Lund (1895-1943) lived here.", "1943", 27),
    ("A well-known house-painter came.", "known", 7),
    ("A well-known house-painter came.", "well-known", 2),
    ("Zoë's café [opened 1921] closed.", "café", 6),
    ("Zoë's café [opened 1921] closed.", "Zoë", 0),
    ("Zoë's café [opened 1921] closed.", "1921", 19),
    ("Lene wrote to Oskar: \"come home\".", "Oskar", 14),
]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
  """Text to train the test tokenizers on (none of the CASES in it)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    a, b = rng.choice(NAMES, 2)
    y = int(rng.integers(1000, 2100))
    out.append(f"{a}'s {rng.choice(THINGS)} is well-known to {b} since {y}, not "
               f"{y + int(rng.integers(1, 80))}.")
    out.append(f"({rng.choice(THINGS)}) [{b}] ({a}) {y}-{rng.choice(THINGS)}")
  return out


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  """The three kinds load_tokenizer reads: a sentencepiece .model, a tokenizer.json
  (that model converted, as export writes it) and a WordPiece vocab.txt."""
  root = tmp_path_factory.mktemp("tok")
  spm_path = train_tokenizer(corpus(), 120, "unigram", str(root / "spm" / "tokenizer"),
                             kind="bert")
  sentencepiece_to_tokenizer(spm_path, "bert").save(str(root / "tokenizer.json"))
  wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  wp.normalizer = normalizers.BertNormalizer(lowercase=True)
  wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  wp.train_from_iterator(corpus(), trainers.WordPieceTrainer(
      vocab_size=150, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
  vocab = sorted(wp.get_vocab().items(), key=lambda kv: kv[1])
  (root / "vocab.txt").write_text("".join(p + "\n" for p, _ in vocab))
  return {"sentencepiece": load_tokenizer(spm_path),
          "tokenizer.json": load_tokenizer(str(root / "tokenizer.json")),
          "vocab.txt": load_tokenizer(str(root / "vocab.txt"))}


def qa_task(**kw):
  return finetune_config(type="qa", labels=(), text_field="question", text_b_field="context",
                         label_field="answers", **kw).task


def records(cases=CASES):
  return [data.Record(dict(question="who or when?", context=c,
                           answers={"text": [a], "answer_start": [s]}), f"cases:{i + 1}")
          for i, (c, a, s) in enumerate(cases)]


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json", "vocab.txt"])
def test_offsets_are_the_tokens_characters(tokenizers, kind):
  tok = tokenizers[kind]
  texts = [c for c, _, _ in CASES]
  for text, (ids, offsets_Tx2) in zip(texts, features.encode_with_offsets(tok, texts)):
    assert ids == tok.encode(text)
    assert (np.diff(offsets_Tx2[:, 0]) >= 0).all()
    assert (offsets_Tx2[:, 1] >= offsets_Tx2[:, 0]).all()
    pieces = [text[a:b] for a, b in offsets_Tx2 if b > a]
    # The tokens' characters are the text's non-space characters, in order, once each.
    assert "".join(pieces) == "".join(text.split())
    assert all(p == p.strip() for p in pieces)


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json", "vocab.txt"])
def test_targets_cover_the_answer_and_perfect_logits_give_exact_match_100(tokenizers, kind):
  tok = tokenizers[kind]
  feats = features.featurize(qa_task(), tok, records(), 64)
  starts, ends = feats.arrays["start_positions"], feats.arrays["end_positions"]
  n = len(starts)
  assert n == len(CASES) and (starts > 0).all()  # one window each, answer inside
  for ex, (context, answer, s) in zip(feats.examples, CASES):
    f = ex["features"][0]
    offsets_Lx2 = ex["offsets"][0]
    # The target tokens hold the answer's own characters, not the word around them.
    assert context[offsets_Lx2[starts[f], 0]:offsets_Lx2[ends[f], 1]] == answer
    assert offsets_Lx2[starts[f], 0] == s and offsets_Lx2[ends[f], 1] == s + len(answer)
  start_logits, end_logits = np.zeros((n, 64)), np.zeros((n, 64))
  start_logits[np.arange(n), starts] = end_logits[np.arange(n), ends] = 10.0
  predicted = features.qa_answers(feats, start_logits, end_logits)
  assert predicted == [a for _, a, _ in CASES]
  scores = metrics.squad_scores(predicted, [ex["answers"] for ex in feats.examples])
  assert scores == dict(exact_match=100.0, f1=100.0)
  # Whole whitespace words (the old targets) would miss most of these answers.
  words = [next(w for w in c.split() if a in w) for c, a, _ in CASES]
  assert metrics.squad_scores(words, [[a] for _, a, _ in CASES])["exact_match"] < 50


def test_spans_across_windows_and_invalid_predictions(tokenizers):
  tok = tokenizers["vocab.txt"]
  context = " ".join(c for c, _, _ in CASES[:4])
  answer_start = context.index("(1895") + 1
  rec = data.Record(dict(question="when?", context=context,
                         answers={"text": ["1895"], "answer_start": [answer_start]}), "x:1")
  feats = features.featurize(qa_task(doc_stride=6, max_query_len=4), tok, [rec], 16)
  ex = feats.examples[0]
  starts, ends = feats.arrays["start_positions"], feats.arrays["end_positions"]
  inside = [f for f in ex["features"] if starts[f] > 0]
  assert len(ex["features"]) > 2 and inside
  n = len(starts)
  start_logits, end_logits = np.zeros((n, 16)), np.zeros((n, 16))
  for f in inside:
    start_logits[f, starts[f]] = end_logits[f, ends[f]] = 10.0
  # The question and [CLS]/[SEP] never make an answer, however high their logits.
  start_logits[:, :3] = end_logits[:, :3] = 50.0
  assert features.qa_answers(feats, start_logits, end_logits) == ["1895"]


def test_answer_text_must_match_the_context_at_its_start(tokenizers):
  bad = [data.Record(dict(question="q", context="Greta's boat",
                          answers={"text": ["Greta"], "answer_start": [1]}), "b.jsonl:3")]
  with pytest.raises(features.AnswerNotInContext, match=r"b\.jsonl:3: answer 'Greta'"):
    features.featurize(qa_task(), tokenizers["vocab.txt"], bad, 32)


def test_an_answer_inside_a_token_gives_the_tokens_that_cover_it(tokenizers):
  tok = tokenizers["vocab.txt"]
  context = "They sailed on Greta's boat."
  assert "greta" in [tok.decode([i]) for i in tok.encode(context)]  # one token
  rec = data.Record(dict(question="q", context=context,
                         answers={"text": ["ret"], "answer_start": [16]}), "x:1")
  feats = features.featurize(qa_task(), tok, [rec], 32)
  starts, ends = feats.arrays["start_positions"], feats.arrays["end_positions"]
  assert starts[0] == ends[0] > 0
  logits = np.zeros((1, 32))
  logits[0, starts[0]] = 10.0
  assert features.qa_answers(feats, logits, logits) == ["Greta"]


def test_targets_and_answers_equal_transformers_offset_mapping(tmp_path):
  """bench/qa_vs_hf.py's set (answers inside longer words) and its Hugging Face side
  (run_qa.py's char -> token targets and offset-mapped decoding, BertTokenizerFast on the
  same vocab.txt): the same rows, targets and, on random logits, the same answers."""
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
  import qa_vs_hf  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  args = qa_vs_hf.parse_args([])
  rows = qa_vs_hf.make_rows(60, 7)
  qa_vs_hf.write_hf_model(str(tmp_path), rows, args, 0)
  tok = load_tokenizer(str(tmp_path / "vocab.txt"))
  recs = [data.Record(r, f"r:{i}") for i, r in enumerate(rows)]
  feats = features.featurize(qa_task(doc_stride=32, max_query_len=16), tok, recs, 64)
  hf_tok = transformers.BertTokenizerFast(str(tmp_path / "vocab.txt"), do_lower_case=True)
  hf, example, offsets = qa_vs_hf.hf_features(hf_tok, rows, args, True)
  assert list(example) == list(range(len(rows)))  # one window per record
  for key in ("input_ids", "token_type_ids", "attention_mask", "start_positions",
              "end_positions"):
    np.testing.assert_array_equal(feats.arrays[key], hf[key], err_msg=key)
  rng = np.random.default_rng(0)
  start, end = rng.normal(size=(2, len(rows), 64))
  ours = features.qa_answers(feats, start, end)
  assert ours == qa_vs_hf.hf_answers(rows, example, offsets, start, end)
