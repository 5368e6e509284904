"""Tokenizers: special-token layouts, determinism, loading, Hugging Face files, errors."""

import numpy as np
import pytest

from plmjax import cli
from plmjax.data import tokenizer as tk
from plmjax.data.tokenizer_train import train_tokenizer
from plmjax.errors import DataError

import synthetic


@pytest.fixture(scope="module")
def texts():
  return synthetic.synthetic_texts(150, seed=1)


@pytest.fixture(scope="module")
def bert_model(tmp_path_factory, texts):
  out = tmp_path_factory.mktemp("bert") / "spm"
  return train_tokenizer(texts, 300, "unigram", str(out), kind="bert")


def test_bert_layout_and_roundtrip(bert_model):
  tok = tk.load_tokenizer(bert_model)
  assert isinstance(tok, tk.SentencePieceTokenizer)
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert tok.eos_id is None and tok.kind == "bert" and tok.vocab_size == 300
  assert tok.special_ids == {0, 1, 2, 3, 4}
  text = "Kalo mine rusa tivo."
  ids = tok.encode(text)
  assert ids and not set(ids) & tok.special_ids
  assert tok.decode(ids) == text
  assert tok.encode_batch([text, "Sa."]) == [ids, tok.encode("Sa.")]
  # "[MASK]" in a document is text, never the mask token.
  assert tok.mask_id not in tok.encode("a [MASK] b") and tok.cls_id not in tok.encode("[CLS]")


def test_word_starts_follow_sentencepiece_pieces(bert_model):
  tok = tk.load_tokenizer(bert_model)
  ids = np.array(tok.encode("Kalomigri stobelfen ho juzor."))
  starts = tok.is_word_start(ids)
  assert starts.dtype == np.bool_ and starts.shape == ids.shape
  expected = [tok.id_to_piece(i).startswith("\u2581") for i in ids]
  assert starts.tolist() == expected and starts[0] and not starts.all()
  assert tok.is_word_start([tok.cls_id, tok.mask_id]).all()


def test_gpt_layout(tmp_path, texts):
  path = train_tokenizer(texts, 250, "bpe", str(tmp_path / "gpt"), kind="gpt")
  tok = tk.load_tokenizer(path)
  assert tok.eos_id == 0 and tok.unk_id == 1 and tok.kind == "gpt"
  assert tok.pad_id is None and tok.mask_id is None and tok.cls_id is None
  assert tok.special_ids == {0, 1}
  assert tok.eos_id not in tok.encode("<|endoftext|>")


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_training_is_deterministic(tmp_path, texts, model_type):
  a = train_tokenizer(texts, 260, model_type, str(tmp_path / "a"))
  b = train_tokenizer(texts, 260, model_type, str(tmp_path / "b"))
  with open(a, "rb") as fa, open(b, "rb") as fb:
    assert fa.read() == fb.read()


def test_max_sentences_limits_the_input(tmp_path, texts):
  few = train_tokenizer(texts, 120, "bpe", str(tmp_path / "few"), max_sentences=20)
  many = train_tokenizer(texts, 120, "bpe", str(tmp_path / "many"))
  with open(few, "rb") as f1, open(many, "rb") as f2:
    assert f1.read() != f2.read()


def test_save_and_load_directory(tmp_path, bert_model):
  tok = tk.load_tokenizer(bert_model)
  saved = tok.save(str(tmp_path / "workdir"))
  again = tk.load_tokenizer(str(tmp_path / "workdir"))
  assert saved.endswith("tokenizer.model") and again.path == saved
  assert again.encode("Kalo mine.") == tok.encode("Kalo mine.")


def test_wordpiece_vocab_txt(tmp_path):
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "play", "##ing",
           "##ed", ".", "on"]
  (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
  tok = tk.load_tokenizer(str(tmp_path))
  assert isinstance(tok, tk.HFTokenizer) and tok.kind == "bert"
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  ids = tok.encode("The cat playing on the mat.")  # lower-cased: the vocabulary is uncased
  assert [vocab[i] for i in ids] == ["the", "cat", "play", "##ing", "on", "the", "[UNK]", "."]
  assert tok.is_word_start(ids).tolist() == [True, True, True, False, True, True, True, True]
  assert tok.decode(tok.encode("the cat sat")) == "the cat sat"
  assert tok.special_ids == {0, 1, 2, 3, 4}


def test_tokenizer_json(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  hf = Tokenizer(models.BPE(unk_token="[UNK]"))
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  hf.train_from_iterator(synthetic.synthetic_texts(40, seed=2), trainer)
  hf.save(str(tmp_path / "tokenizer.json"))
  tok = tk.load_tokenizer(str(tmp_path / "tokenizer.json"))
  assert tok.kind == "gpt" and tok.eos_id == 0 and 0 in tok.special_ids
  ids = tok.encode("Kalo mine rusa")
  assert tok.eos_id not in ids
  # Byte-level pieces: a word start is a piece beginning with 'Ġ' (an encoded space).
  pieces = [hf.id_to_token(i) for i in ids]
  assert tok.is_word_start(ids).tolist() == [p.startswith("\u0120") for p in pieces]


def test_missing_and_corrupt_files(tmp_path):
  with pytest.raises(DataError, match="nowhere.model"):
    tk.load_tokenizer(str(tmp_path / "nowhere.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(DataError, match="bad.model"):
    tk.load_tokenizer(str(bad))
  (tmp_path / "tokenizer.json").write_text("{broken")
  with pytest.raises(DataError, match="tokenizer.json"):
    tk.load_tokenizer(str(tmp_path / "tokenizer.json"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="empty holds no tokenizer"):
    tk.load_tokenizer(str(tmp_path / "empty"))


def test_check_vocab_and_special_tokens(bert_model):
  tok = tk.load_tokenizer(bert_model)
  tk.check_vocab(tok, 300)
  tk.check_vocab(tok, 512, exact=False)
  with pytest.raises(DataError, match="config.model.vocab_size=300"):
    tk.check_vocab(tok, 256)
  with pytest.raises(DataError, match="config.model.vocab_size=300"):
    tk.check_vocab(tok, 512)
  tk.check_special_tokens(tok, "bert")
  with pytest.raises(DataError, match="<\\|endoftext\\|>"):
    tk.check_special_tokens(tok, "gpt")


def test_too_large_vocab_is_a_clear_error(tmp_path, texts):
  with pytest.raises(DataError, match="vocab-size 100000"):
    train_tokenizer(texts[:5], 100000, "bpe", str(tmp_path / "x"))


def test_too_large_vocab_names_the_config_key(tmp_path, texts):
  with pytest.raises(DataError) as e:
    train_tokenizer(texts[:5], 8000, "unigram", str(tmp_path / "out" / "tok"),
                       vocab_key="config.model.vocab_size")
  msg = str(e.value)
  most = int(msg.split("at most ")[1].split()[0])
  assert msg == (f"config.model.vocab_size=8000 is too large for this corpus: sentencepiece can "
                 f"make at most {most} pieces from it; lower config.model.vocab_size or add text")
  assert 5 < most < 8000 and "--vocab-size" not in msg
  assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
  # The size it names is one sentencepiece accepts.
  path = train_tokenizer(texts[:5], most, "unigram", str(tmp_path / "out" / "tok"))
  assert tk.load_tokenizer(path).vocab_size == most


def test_cli_train(tmp_path, texts, capsys):
  corpus = synthetic.write_corpus(str(tmp_path / "c.jsonl"), texts)
  prefix = tmp_path / "out" / "spm"
  argv = ["tokenizer", "train", "--input", corpus, "--vocab-size", "200", "--model-type", "bpe",
          "--out", str(prefix), "--kind", "gpt", "--max-sentences", "500"]
  assert cli.main(argv) == 0
  assert (tmp_path / "out" / "spm.model").exists() and (tmp_path / "out" / "spm.vocab").exists()
  tok = tk.load_tokenizer(str(prefix) + ".model")
  assert tok.kind == "gpt" and tok.vocab_size == 200
  assert "spm.model" in capsys.readouterr().out
  # A glob that matches nothing: one line naming the flag and the glob, exit status 2.
  argv[3] = str(tmp_path / "nothing*.txt")
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("plmjax: error: --input=") and "nothing*.txt" in err and "\n" not in err
  # A vocabulary too large for the corpus: one line naming the flag.
  argv[3], argv[5] = corpus, "100000"
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("plmjax: error: --vocab-size 100000 is too large for this corpus")
  assert "lower --vocab-size or add text" in err and "\n" not in err


def test_cli_train_on_real_text(tmp_path, wiki_sample):
  argv = ["tokenizer", "train", "--input", str(wiki_sample), "--vocab-size", "400",
          "--model-type", "bpe", "--out", str(tmp_path / "wiki"), "--max-sentences", "800"]
  assert cli.main(argv) == 0
  tok = tk.load_tokenizer(str(tmp_path / "wiki.model"))
  ids = tok.encode("The history of the alphabet")
  assert tok.decode(ids) == "The history of the alphabet" and len(ids) < 20
  assert sorted(tok.special_ids) == [0, 1, 2, 3, 4]
