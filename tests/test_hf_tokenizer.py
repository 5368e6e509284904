"""Tokenizer export (sentencepiece -> tokenizer.json) and import (vocab.txt, GPT-2 BPE)."""

import json
import os

import pytest
import transformers
from tokenizers import ByteLevelBPETokenizer, BertWordPieceTokenizer

from hf_helpers import trained_sentencepiece, wiki_lines
from plmjax.data.tokenizer import load_tokenizer
from plmjax.errors import DataError
from plmjax.export import hf_tokenizer

# Held-out text: articles the tokenizers were not trained on.
HELD_OUT = slice(60, 95)  # never used for training


@pytest.fixture
def held_out(wiki_sample):
  lines = wiki_lines(wiki_sample, HELD_OUT)
  assert len(lines) >= 300
  return lines[:400]


@pytest.mark.parametrize("kind,model_type,byte_fallback", [
    ("bert", "unigram", False), ("bert", "bpe", False), ("gpt", "unigram", True),
    ("gpt", "bpe", False)])
def test_same_ids_as_plmjax_tokenizer(wiki_sample, tmp_path_factory, held_out, kind, model_type,
                                      byte_fallback):
  model = trained_sentencepiece(wiki_sample, tmp_path_factory.mktemp("spm"), kind, model_type,
                                byte_fallback)
  ours = load_tokenizer(model)
  hf = hf_tokenizer.sentencepiece_to_tokenizer(model, kind)
  assert hf.get_vocab_size() == ours.vocab_size
  want = ours.encode_batch(held_out)
  got = [e.ids for e in hf.encode_batch(held_out, add_special_tokens=False)]
  mismatched = [t for t, a, b in zip(held_out, want, got) if a != b]
  assert not mismatched, mismatched[:2]
  assert sum(map(len, want)) > 20_000  # real coverage, not a handful of tokens
  if byte_fallback:  # unseen characters become bytes, and decode back
    text = "Ωmega ⟂ ✓ 𝔘nicode"  # NFKC (sentencepiece's default) turns 𝔘 into U
    ids = ours.encode(text)
    assert hf.encode(text, add_special_tokens=False).ids == ids
    assert hf.decode(ids) == ours.decode(ids) == "Ωmega ⟂ ✓ Unicode"


def _export_tokenizer(wiki_sample, tmp_path, kind):
  tok_dir = tmp_path / "tokenizer"
  tok_dir.mkdir()
  model = trained_sentencepiece(wiki_sample, tmp_path, kind)
  os.link(model, tok_dir / "tokenizer.model")
  out = tmp_path / "hf"
  out.mkdir()
  files = hf_tokenizer.write_hf_tokenizer(str(tok_dir), str(out), kind=kind, model_max_length=64)
  return load_tokenizer(model), out, files


def test_auto_tokenizer_loads_bert_export(wiki_sample, tmp_path, held_out):
  ours, out, files = _export_tokenizer(wiki_sample, tmp_path, "bert")
  assert files == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert isinstance(tok, transformers.PreTrainedTokenizerFast)
  assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id,
          tok.mask_token_id) == (0, 1, 2, 3, 4)
  assert tok.model_max_length == 64
  for text in held_out[:50]:
    ids = ours.encode(text)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    assert tok(text)["input_ids"] == [2] + ids + [3]
  pair = tok("first part", "second part")
  a, b = ours.encode("first part"), ours.encode("second part")
  assert pair["input_ids"] == [2] + a + [3] + b + [3]
  assert pair["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
  batch = tok(held_out[:3], padding=True)
  assert batch["input_ids"][0].count(0) == batch["attention_mask"][0].count(0)


def test_auto_tokenizer_loads_gpt_export(wiki_sample, tmp_path, held_out):
  ours, out, _ = _export_tokenizer(wiki_sample, tmp_path, "gpt")
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == ours.eos_id == 0
  for text in held_out[:50]:
    assert tok(text)["input_ids"] == ours.encode(text)  # GPT adds no special tokens
  assert tok.decode(ours.encode(held_out[0])) == ours.decode(ours.encode(held_out[0]))


def _wordpiece_dir(wiki_sample, path, lowercase):
  trainer = BertWordPieceTokenizer(lowercase=lowercase)
  trainer.train_from_iterator(wiki_lines(wiki_sample, slice(0, 30)), vocab_size=800,
                              special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
  path.mkdir()
  trainer.save_model(str(path))
  (path / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase}))
  return path


@pytest.mark.parametrize("lowercase", [True, False])
def test_imported_wordpiece_matches_transformers(wiki_sample, tmp_path, held_out, lowercase):
  src = _wordpiece_dir(wiki_sample, tmp_path / "src", lowercase)
  files = hf_tokenizer.import_hf_tokenizer(str(src), str(tmp_path / "tok"), "bert")
  assert files == ["tokenizer.json", "tokenizer_config.json", "vocab.txt"]
  ours = load_tokenizer(tmp_path / "tok")  # what plmjax's data code will use
  theirs = transformers.AutoTokenizer.from_pretrained(src)  # from vocab.txt
  assert ours.kind == "bert" and ours.mask_id == theirs.mask_token_id
  for text in held_out[:200]:
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text


def test_vocab_txt_settings_match_transformers(wiki_sample, tmp_path, held_out):
  """A bare vocab.txt read by plmjax's data code honours tokenizer_config.json as transformers."""
  src = _wordpiece_dir(wiki_sample, tmp_path / "src", False)
  (src / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "BertTokenizer", "do_lower_case": False, "strip_accents": True,
       "tokenize_chinese_chars": False}))
  ours = load_tokenizer(src / "vocab.txt")
  theirs = transformers.AutoTokenizer.from_pretrained(src)
  texts = ["Café Müller in São Paulo, naïve résumé.", "北京市 is Beijing; 東京 is Tokyo."]
  for text in texts + held_out[:100]:
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text


def test_imported_gpt2_bpe_matches_transformers(wiki_sample, tmp_path, held_out):
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(wiki_lines(wiki_sample, slice(0, 30)), vocab_size=600,
                          special_tokens=["<|endoftext|>"])
  src = tmp_path / "src"
  src.mkdir()
  bpe.save_model(str(src))  # vocab.json + merges.txt, as OpenAI's GPT-2 ships
  files = hf_tokenizer.import_hf_tokenizer(str(src), str(tmp_path / "tok"), "gpt")
  assert files == ["merges.txt", "tokenizer.json", "vocab.json"]
  ours = load_tokenizer(tmp_path / "tok")
  theirs = transformers.GPT2Tokenizer.from_pretrained(src)  # from vocab.json + merges.txt
  assert ours.kind == "gpt" and ours.eos_id == theirs.eos_token_id
  for text in held_out[:200]:
    assert ours.encode(text) == theirs(text)["input_ids"], text


def test_bad_tokenizer_files(tmp_path):
  (tmp_path / "bad.model").write_bytes(b"not a model")
  with pytest.raises(DataError, match="bad.model"):
    hf_tokenizer.sentencepiece_to_tokenizer(str(tmp_path / "bad.model"), "bert")
  (tmp_path / "vocab.txt").write_text("a\nb\n")
  with pytest.raises(DataError, match=r"lacks \[PAD\]"):
    hf_tokenizer.import_hf_tokenizer(str(tmp_path), str(tmp_path / "out"), "bert")
  assert hf_tokenizer.import_hf_tokenizer(str(tmp_path / "missing"), str(tmp_path / "o"),
                                          "bert") is None
