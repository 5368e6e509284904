"""Tokenizers: sentencepiece models trained here, or Hugging Face tokenizers imported.

Special-token layouts of the sentencepiece models `plmjax.data.tokenizer_train` writes:

  kind='bert':  [PAD]=0  [UNK]=1  [CLS]=2  [SEP]=3  [MASK]=4, then the learned pieces.
  kind='gpt':   <|endoftext|>=0  <unk>=1, then the learned pieces. No pad token: GPT
                batches pad with <|endoftext|> and give those positions loss weight 0.
  kind='t5':    <pad>=0  </s>=1  <unk>=2, then the learned pieces, then 100 sentinels
                <extra_id_99> .. <extra_id_0> (<extra_id_0> is the highest id), as Hugging
                Face's T5 tokenizer numbers them. The .model file holds no sentinels (as
                Google's spiece.model): any sentencepiece model laid out <pad> </s> <unk>
                reads as a T5 tokenizer with 100 sentinels above its pieces. Sentinel text
                such as "<extra_id_3>" encodes to the sentinel, as in Hugging Face.

[CLS]/[SEP]/[MASK] are sentencepiece *control* symbols: the text "[MASK]" in a
document is encoded as ordinary characters and can never become a real mask.
"""

import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from plmjax.errors import DataError

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
EOT = "<|endoftext|>"
MODEL_TYPES = ("unigram", "bpe")
KINDS = ("bert", "gpt", "t5")
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
T5_NUM_SENTINELS = 100
_SENTINEL = re.compile(r"<extra_id_(\d+)>")


def sentinel_piece(i: int) -> str:
  return f"<extra_id_{i}>"


class Tokenizer:
  """What the data pipeline and the trainer need from a tokenizer."""

  path: str
  vocab_size: int
  pad_id: int | None = None
  unk_id: int | None = None
  cls_id: int | None = None
  sep_id: int | None = None
  mask_id: int | None = None
  eos_id: int | None = None
  # T5: id of <extra_id_0>; sentinel i is sentinel_id - i (Hugging Face's numbering).
  sentinel_id: int | None = None
  # vocab_size booleans: True where a piece starts a word (whole-word masking).
  _word_start: np.ndarray
  _special: set[int]

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    raise NotImplementedError

  def id_to_piece(self, i: int) -> str:
    raise NotImplementedError

  def encode_with_offsets(self, texts: Sequence[str]) -> list[tuple[list[int], list[str],
                                                                     np.ndarray]]:
    """Per text: ids (as encode gives them), pieces, and each token's (start, end)
    characters in the text (Nx2)."""
    raise DataError(f"tokenizer {self.path} gives no character offsets; use a sentencepiece "
                    ".model, a tokenizer.json or a vocab.txt")

  def is_word_start(self, ids) -> np.ndarray:
    return self._word_start[np.asarray(ids, dtype=np.int64)]

  @property
  def special_ids(self) -> set[int]:
    return set(self._special)

  @property
  def kind(self) -> str:
    if None not in (self.cls_id, self.sep_id, self.mask_id):
      return "bert"
    if self.sentinel_id is not None and self.eos_id is not None:
      return "t5"
    if self.eos_id is not None:
      return "gpt"
    raise DataError(f"tokenizer {self.path} has neither the BERT special tokens "
                    f"({', '.join(BERT_SPECIALS)}) nor {EOT} nor T5's </s> and sentinels")

  def sentinel(self, i: int) -> int:
    """The id of <extra_id_i>."""
    if self.sentinel_id is None:
      raise DataError(f"tokenizer {self.path} has no T5 sentinels (<extra_id_0>..)")
    return self.sentinel_id - i

  def save(self, directory: str) -> str:
    raise NotImplementedError

  def _finish_init(self, extra_special: Iterable[int] = ()):
    named = (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id, self.eos_id)
    self._special = {i for i in named if i is not None} | set(extra_special)
    self._word_start[list(self._special)] = True  # a special token is a word on its own


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece `.model` file (unigram or BPE)."""

  def __init__(self, model_path: str):
    self.path = os.fspath(model_path)
    if not os.path.isfile(self.path):
      raise DataError(f"tokenizer file {self.path} does not exist; train one with "
                      "`plmjax tokenizer train` or set config.data.tokenizer")
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(self.path)
    except (OSError, RuntimeError) as e:
      raise DataError(f"tokenizer file {self.path} is not a sentencepiece model ({e})") from e
    self.vocab_size = pieces_size = self._sp.get_piece_size()
    t5 = [self._sp.id_to_piece(i) for i in range(min(3, pieces_size))] == list(T5_SPECIALS)
    if t5:  # sentinels above the pieces
      self.vocab_size = pieces_size + T5_NUM_SENTINELS
      self.sentinel_id = self.vocab_size - 1

    def lookup(piece):
      i = self._sp.piece_to_id(piece)
      return i if self._sp.id_to_piece(i) == piece else None

    self.pad_id, self.unk_id = lookup("[PAD]"), self._sp.unk_id()
    self.cls_id, self.sep_id, self.mask_id = lookup("[CLS]"), lookup("[SEP]"), lookup("[MASK]")
    self.eos_id = lookup(EOT)
    if t5:
      self.pad_id, self.eos_id, self.unk_id = 0, 1, 2
    if self.pad_id is None and self._sp.pad_id() >= 0:
      self.pad_id = self._sp.pad_id()
    pieces = [self._sp.id_to_piece(i) for i in range(pieces_size)]
    self._word_start = np.array([p.startswith("\u2581") for p in pieces] +
                                [True] * (self.vocab_size - pieces_size), dtype=np.bool_)
    control = [i for i in range(pieces_size) if self._sp.is_control(i)]
    self._finish_init(control + list(range(pieces_size, self.vocab_size)))

  def encode(self, text: str) -> list[int]:
    if self.sentinel_id is not None and "<extra_id_" in text:
      return self._encode_with_sentinels(text)
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    if self.sentinel_id is not None and any("<extra_id_" in t for t in texts):
      return [self.encode(t) for t in texts]
    return self._sp.encode(list(texts))

  def _encode_with_sentinels(self, text: str) -> list[int]:
    """Sentinel text as the sentinel's id and the text between as sentencepiece
    encodes it (Hugging Face's added tokens split the text the same way)."""
    ids, start = [], 0
    for m in _SENTINEL.finditer(text):
      i = int(m.group(1))
      if i >= T5_NUM_SENTINELS:
        continue
      ids += self._sp.encode(text[start:m.start()]) + [self.sentinel(i)]
      start = m.end()
    return ids + self._sp.encode(text[start:])

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    n = self._sp.get_piece_size()
    if all(i < n for i in ids):
      return self._sp.decode(ids)
    # Sentinels as their text between decoded runs of pieces.
    parts, run = [], []
    for i in ids:
      if i < n:
        run.append(i)
        continue
      parts += [self._sp.decode(run), self.id_to_piece(i)]
      run = []
    return " ".join(p for p in parts + [self._sp.decode(run)] if p)

  def encode_with_offsets(self, texts):
    # sentencepiece reports byte offsets into the original text (normalisation undone).
    out = []
    for text, proto in zip(texts, self._sp.encode(list(texts), out_type="proto")):
      char = np.arange(len(text) + 1)
      if len(text.encode("utf-8")) != len(text):  # byte -> character
        sizes = [len(c.encode("utf-8")) for c in text]
        char = np.append(np.repeat(np.arange(len(text)), sizes), len(text))
      pieces = list(proto.pieces)
      offsets = np.array([(char[p.begin], char[p.end]) for p in pieces], np.int64)
      out.append(([p.id for p in pieces], [p.piece for p in pieces], offsets.reshape(-1, 2)))
    return out

  def id_to_piece(self, i: int) -> str:
    i = int(i)
    if i >= self._sp.get_piece_size():
      return sentinel_piece(self.sentinel_id - i)
    return self._sp.id_to_piece(i)

  def save(self, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    dest = os.path.join(directory, "tokenizer.model")
    if os.path.abspath(dest) != os.path.abspath(self.path):
      shutil.copyfile(self.path, dest)
    return dest


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json`, or a BERT WordPiece `vocab.txt`.

  `encode` never adds special tokens: the example builders add [CLS]/[SEP].
  """

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=g-import-not-at-top

    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise DataError(f"tokenizer file {self.path} does not exist")
    try:
      if os.path.basename(self.path).endswith(".json"):
        self._tok = tokenizers.Tokenizer.from_file(self.path)
      else:
        self._tok = _wordpiece_from_vocab(self.path)
    except DataError:
      raise
    except Exception as e:  # tokenizers raises plain Exceptions on bad files.
      raise DataError(f"tokenizer file {self.path} cannot be read ({e})") from e
    self._tok.no_truncation()  # a tokenizer.json may carry them; rows are cut by the builders
    self._tok.no_padding()
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    lookup = self._tok.token_to_id
    self.pad_id, self.unk_id = lookup("[PAD]"), lookup("[UNK]")
    self.cls_id, self.sep_id, self.mask_id = lookup("[CLS]"), lookup("[SEP]"), lookup("[MASK]")
    self.eos_id = lookup(EOT)
    self.sentinel_id = lookup(sentinel_piece(0))
    if self.sentinel_id is not None:  # a T5 tokenizer.json
      self.pad_id, self.eos_id, self.unk_id = (lookup(p) for p in T5_SPECIALS)
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self._word_start = np.ones(self.vocab_size, dtype=np.bool_)
    rule = _word_start_rule(type(self._tok.model).__name__, vocab)
    for piece, i in vocab.items():
      if i < self.vocab_size:
        self._word_start[i] = rule(piece)
    added = self._tok.get_added_tokens_decoder()
    self._finish_init(i for i, t in added.items() if t.special and i < self.vocab_size)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i))

  def encode_with_offsets(self, texts):
    return [(list(e.ids), list(e.tokens), np.array(e.offsets, np.int64).reshape(-1, 2))
            for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def save(self, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    dest = os.path.join(directory, os.path.basename(self.path))
    if os.path.abspath(dest) != os.path.abspath(self.path):
      shutil.copyfile(self.path, dest)
      config = os.path.join(os.path.dirname(self.path), "tokenizer_config.json")
      if os.path.isfile(config):
        shutil.copyfile(config, os.path.join(directory, "tokenizer_config.json"))
    return dest


def _word_start_rule(model_name: str, vocab: dict[str, int]):
  if model_name == "WordPiece":
    return lambda piece: not piece.startswith("##")
  for marker in ("\u0120", "\u2581"):  # GPT-2 byte-level 'Ġ', sentencepiece '▁'
    if any(p.startswith(marker) for p in vocab):
      return lambda piece, m=marker: piece.startswith(m)
  return lambda piece: True


def wordpiece_tokenizer(vocab_path: str, *, lowercase: bool = True,
                        tokenize_chinese_chars: bool = True, strip_accents: bool | None = None):
  """A BERT WordPiece `vocab.txt` as transformers' BertTokenizer builds it.

  The settings are tokenizer_config.json's do_lower_case, tokenize_chinese_chars and
  strip_accents (None: strip when lower-casing). The [CLS] A [SEP] template is not set:
  plmjax's data code adds special tokens itself (export adds it for transformers).
  """
  from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
  from tokenizers import Tokenizer as HFTok  # pylint: disable=g-import-not-at-top

  with open(vocab_path, encoding="utf-8") as f:
    pieces = [line.rstrip("\n") for line in f]
  if not any(pieces):
    raise DataError(f"{vocab_path} is empty; a WordPiece vocab.txt has one token per line")
  vocab = {p: i for i, p in enumerate(pieces)}
  tok = HFTok(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=tokenize_chinese_chars,
      strip_accents=strip_accents, lowercase=lowercase)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix="##")
  tok.add_special_tokens([AddedToken(p, special=True) for p in BERT_SPECIALS if p in vocab])
  return tok


def _wordpiece_from_vocab(vocab_path: str):
  """wordpiece_tokenizer with the settings of tokenizer_config.json beside vocab_path."""
  config = {}
  config_path = os.path.join(os.path.dirname(vocab_path), "tokenizer_config.json")
  if os.path.isfile(config_path):
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
  lowercase = config.get("do_lower_case")
  if lowercase is None:  # an uncased vocabulary has no upper-case pieces
    with open(vocab_path, encoding="utf-8") as f:
      lowercase = not any(p != p.lower() for p in f if not p.startswith("["))
  return wordpiece_tokenizer(vocab_path, lowercase=lowercase,
                             tokenize_chinese_chars=config.get("tokenize_chinese_chars", True),
                             strip_accents=config.get("strip_accents"))


def load_tokenizer(path: str) -> Tokenizer:
  """A `.model`, a `tokenizer.json`, a `vocab.txt`, or a directory holding one."""
  path = os.fspath(path)
  if os.path.isdir(path):
    for name in ("tokenizer.model", "tokenizer.json", "vocab.txt", "spiece.model"):
      if os.path.isfile(os.path.join(path, name)):
        return load_tokenizer(os.path.join(path, name))
    models = sorted(f for f in os.listdir(path) if f.endswith(".model"))
    if len(models) == 1:
      return load_tokenizer(os.path.join(path, models[0]))
    raise DataError(f"directory {path} holds no tokenizer (tokenizer.model, tokenizer.json, "
                    "vocab.txt or one *.model file)")
  if not os.path.exists(path):
    raise DataError(f"tokenizer {path} does not exist; train one with `plmjax tokenizer train` "
                    "or set config.data.tokenizer")
  if path.endswith(".json") or path.endswith(".txt"):
    return HFTokenizer(path)
  return SentencePieceTokenizer(path)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, *, exact: bool = True):
  """The embedding table must cover the tokenizer (and, if `exact`, match it)."""
  n = tokenizer.vocab_size
  if n > model_vocab_size or (exact and n != model_vocab_size):
    raise DataError(f"tokenizer {tokenizer.path} has {n} tokens but config.model.vocab_size="
                    f"{model_vocab_size}; set config.model.vocab_size={n}")


def check_special_tokens(tokenizer: Tokenizer, arch: str):
  """BERT needs [PAD]/[CLS]/[SEP]/[MASK]; GPT needs <|endoftext|>; T5 <pad>, </s> and
  the sentinels."""
  if arch == "bert":
    missing = [p for p, i in zip(BERT_SPECIALS, (tokenizer.pad_id, tokenizer.unk_id,
                                                 tokenizer.cls_id, tokenizer.sep_id,
                                                 tokenizer.mask_id)) if i is None]
  elif arch == "t5":
    missing = [p for p, i in (("<pad>", tokenizer.pad_id), ("</s>", tokenizer.eos_id),
                              (sentinel_piece(0), tokenizer.sentinel_id)) if i is None]
  else:
    missing = [EOT] if tokenizer.eos_id is None else []
  if missing:
    raise DataError(f"tokenizer {tokenizer.path} lacks {', '.join(missing)} needed by "
                    f"config.model.arch={arch!r}; train one with --kind {arch}")
