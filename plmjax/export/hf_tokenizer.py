"""Tokenizer files for Hugging Face: sentencepiece -> `tokenizer.json`, and back in.

A sentencepiece model is rebuilt with the `tokenizers` library from its own
proto: the same pieces and scores (Unigram, or BPE with merges recovered from
the piece order), its precompiled normaliser, whitespace handling as a Metaspace
pre-tokenizer, byte fallback when it was trained with it. transformers loads
the result as `PreTrainedTokenizerFast` through `tokenizer_config.json`.

T5 (kind='t5'): the 100 sentinels <extra_id_99>..<extra_id_0> are added above the
pieces (<extra_id_0> highest) and `</s>` is appended to every sequence, as Hugging
Face's T5 tokenizer does.

Imported Hugging Face tokenizers (WordPiece `vocab.txt`, GPT-2 `vocab.json` +
`merges.txt`, T5 `spiece.model`) get a `tokenizer.json` too, built the way transformers builds
them, so plmjax's data code and transformers split text identically.
"""

import glob
import json
import os
import shutil

from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors

from plmjax.data.tokenizer import T5_NUM_SENTINELS, sentinel_piece, wordpiece_tokenizer
from plmjax.errors import DataError

SPIECE = "\u2581"  # sentencepiece's whitespace symbol
BERT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                 "sep_token": "[SEP]", "mask_token": "[MASK]"}
GPT_EOS = "<|endoftext|>"
T5_SPECIALS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
T5_SPIECE = "spiece.model"  # a T5 sentencepiece model as transformers 4 saved it
# Files of a Hugging Face tokenizer that travel with a model.
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt",
                      "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def read_sentencepiece_proto(model_path: str) -> sentencepiece_model_pb2.ModelProto:
  proto = sentencepiece_model_pb2.ModelProto()
  try:
    with open(model_path, "rb") as f:
      proto.ParseFromString(f.read())
  except Exception as e:  # protobuf raises DecodeError, files raise OSError
    raise DataError(f"{model_path} is not a readable sentencepiece model ({e})") from e
  if not proto.pieces:
    raise DataError(f"{model_path} holds no sentencepiece pieces")
  return proto


def _bpe_merges(pieces: list[str], normal: set[int]) -> list[tuple[str, str]]:
  """Merges of a sentencepiece BPE model, recovered from its pieces.

  sentencepiece merges the pair whose joined piece scores highest, and BPE
  scores fall with the piece id, so a merge's rank is its result's id.
  """
  ids = {p: i for i, p in enumerate(pieces) if i in normal}
  merges = []
  for piece, piece_id in ids.items():
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in ids and right in ids:
        merges.append((piece_id, ids[left], ids[right], left, right))
  merges.sort()
  return [(left, right) for *_, left, right in merges]


def sentencepiece_to_tokenizer(model_path: str, kind: str) -> Tokenizer:
  """A `tokenizers.Tokenizer` that reproduces the sentencepiece model's ids."""
  proto = read_sentencepiece_proto(model_path)
  trainer, norm = proto.trainer_spec, proto.normalizer_spec
  pieces = [p.piece for p in proto.pieces]
  types = [p.type for p in proto.pieces]
  if trainer.treat_whitespace_as_suffix:
    raise DataError(f"{model_path}: treat_whitespace_as_suffix=true is not supported by the export")
  if trainer.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
    model = models.Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=trainer.unk_id,
                           byte_fallback=trainer.byte_fallback)
  elif trainer.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
    normal = {i for i, t in enumerate(types) if t == _NORMAL}
    model = models.BPE({p: i for i, p in enumerate(pieces)}, _bpe_merges(pieces, normal),
                       unk_token=pieces[trainer.unk_id], fuse_unk=True,
                       byte_fallback=trainer.byte_fallback)
  else:
    raise DataError(f"{model_path}: sentencepiece model type {trainer.model_type} is not "
                    "supported by the export (unigram or bpe)")
  tokenizer = Tokenizer(model)

  steps = []
  if norm.precompiled_charsmap:
    steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
  if norm.remove_extra_whitespaces:
    # sentencepiece drops leading/trailing spaces and collapses runs of them.
    steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
  if steps:
    tokenizer.normalizer = normalizers.Sequence(steps)
  prepend = "always" if norm.add_dummy_prefix else "never"
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
      replacement=SPIECE, prepend_scheme=prepend, split=trainer.split_by_whitespace)
  # Pieces -> text: '▁' back to spaces, byte pieces back to UTF-8, the dummy prefix off.
  steps = [decoders.Replace(SPIECE, " ")]
  if trainer.byte_fallback:
    steps.append(decoders.ByteFallback())
  steps.append(decoders.Fuse())
  if norm.add_dummy_prefix:
    steps.append(decoders.Strip(content=" ", left=1, right=0))
  tokenizer.decoder = decoders.Sequence(steps)

  # Control and user-defined pieces become added tokens (matched before the model);
  # the unknown piece too, so transformers treats it as special.
  specials = set(BERT_SPECIALS.values()) | {GPT_EOS}
  tokenizer.add_special_tokens([
      AddedToken(pieces[i], special=True, normalized=False)
      for i, t in enumerate(types)
      if t in (_UNKNOWN, _CONTROL) or (t == _USER_DEFINED and pieces[i] in specials)])
  tokenizer.add_tokens([AddedToken(pieces[i], normalized=False)
                        for i, t in enumerate(types)
                        if t == _USER_DEFINED and pieces[i] not in specials])
  if kind == "bert":
    add_bert_post_processor(tokenizer)
  if kind == "t5":
    add_t5_sentinels_and_eos(tokenizer)
  return tokenizer


def add_t5_sentinels_and_eos(tokenizer: Tokenizer):
  """<extra_id_99>..<extra_id_0> as special tokens above the pieces, and `A </s>`."""
  eos = T5_SPECIALS["eos_token"]
  if tokenizer.token_to_id(eos) is None:
    raise DataError(f"the tokenizer has no {eos} token; a T5 tokenizer needs <pad>, </s> "
                    "and <unk> (plmjax tokenizer train --kind t5)")
  if tokenizer.token_to_id(sentinel_piece(0)) is None:
    tokenizer.add_special_tokens([AddedToken(sentinel_piece(i), special=True, normalized=False)
                                  for i in reversed(range(T5_NUM_SENTINELS))])
  tokenizer.post_processor = processors.TemplateProcessing(
      single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:0 {eos}:0",
      special_tokens=[(eos, tokenizer.token_to_id(eos))])


def add_bert_post_processor(tokenizer: Tokenizer):
  """[CLS] A [SEP] (B [SEP]) with token types 0 for A, 1 for B."""
  cls, sep = BERT_SPECIALS["cls_token"], BERT_SPECIALS["sep_token"]
  missing = [t for t in (cls, sep) if tokenizer.token_to_id(t) is None]
  if missing:
    raise DataError(f"the tokenizer has no {' or '.join(missing)} token; a BERT tokenizer needs "
                    "[PAD], [UNK], [CLS], [SEP] and [MASK]")
  tokenizer.post_processor = processors.TemplateProcessing(
      single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
      special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))])


def _bert_wordpiece(vocab_path: str, config: dict) -> Tokenizer:
  """vocab.txt with tokenizer_config.json's settings, and the [CLS] A [SEP] template."""
  with open(vocab_path, encoding="utf-8") as f:
    vocab = {line.rstrip("\n") for line in f}
  missing = [t for t in BERT_SPECIALS.values() if t not in vocab]
  if vocab and missing:
    raise DataError(f"{vocab_path} lacks {', '.join(missing)}; a BERT vocab.txt needs "
                    "[PAD], [UNK], [CLS], [SEP] and [MASK]")
  tokenizer = wordpiece_tokenizer(
      vocab_path, lowercase=config.get("do_lower_case", True),
      tokenize_chinese_chars=config.get("tokenize_chinese_chars", True),
      strip_accents=config.get("strip_accents"))
  add_bert_post_processor(tokenizer)
  return tokenizer


def byte_level_bpe_tokenizer(vocab_path: str, merges_path: str) -> Tokenizer:
  """GPT-2's `vocab.json` + `merges.txt` as transformers' GPT2Tokenizer builds it."""
  vocab, merges = models.BPE.read_file(vocab_path, merges_path)
  tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
  if GPT_EOS in vocab:
    tokenizer.add_special_tokens([AddedToken(GPT_EOS, special=True)])
  return tokenizer


def special_tokens_map(tokenizer: Tokenizer, kind: str) -> dict[str, str]:
  """Special-token roles present in the vocabulary."""
  if kind == "bert":
    roles = BERT_SPECIALS
  elif kind == "t5":
    roles = T5_SPECIALS
  else:
    roles = {"bos_token": GPT_EOS, "eos_token": GPT_EOS, "unk_token": GPT_EOS}
    for role, name in (("pad_token", "<pad>"), ("pad_token", "[PAD]"), ("unk_token", "<unk>")):
      if tokenizer.token_to_id(name) is not None:
        roles = {**roles, role: name}
  return {role: name for role, name in roles.items() if tokenizer.token_to_id(name) is not None}


def tokenizer_config(tokenizer: Tokenizer, kind: str, model_max_length: int) -> dict:
  return dict(
      tokenizer_class="PreTrainedTokenizerFast",
      model_max_length=model_max_length,
      clean_up_tokenization_spaces=False,
      model_input_names=(["input_ids", "token_type_ids", "attention_mask"] if kind == "bert"
                         else ["input_ids", "attention_mask"]),
      **special_tokens_map(tokenizer, kind))


def _write_json(path: str, value: dict):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, ensure_ascii=False)
    f.write("\n")


def find_sentencepiece_model(tokenizer_dir: str) -> str | None:
  found = sorted(glob.glob(os.path.join(tokenizer_dir, "*.model")))
  preferred = os.path.join(tokenizer_dir, "tokenizer.model")
  return preferred if preferred in found else (found[0] if found else None)


def write_hf_tokenizer(tokenizer_dir: str, out_dir: str, *, kind: str,
                       model_max_length: int) -> list[str]:
  """Writes tokenizer.json + tokenizer_config.json + special_tokens_map.json to out_dir.

  `tokenizer_dir` is a workdir's tokenizer/ folder: a sentencepiece model, or the
  Hugging Face files import-hf carried in. Returns the names written.
  """
  spm_path = find_sentencepiece_model(tokenizer_dir)
  hf_json = os.path.join(tokenizer_dir, "tokenizer.json")
  written = []
  if spm_path:
    tokenizer = sentencepiece_to_tokenizer(spm_path, kind)
  elif os.path.isfile(hf_json):
    tokenizer = Tokenizer.from_file(hf_json)
    # Carry the original files (vocab.txt lets slow tokenizers load too).
    for name in HF_TOKENIZER_FILES:
      src = os.path.join(tokenizer_dir, name)
      if os.path.isfile(src):
        shutil.copyfile(src, os.path.join(out_dir, name))
        written.append(name)
  else:
    tokenizer = load_hf_tokenizer_dir(tokenizer_dir, kind)
  if "tokenizer.json" not in written:
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
  generated = {"tokenizer_config.json": tokenizer_config(tokenizer, kind, model_max_length),
               "special_tokens_map.json": special_tokens_map(tokenizer, kind)}
  for name, value in generated.items():
    if name not in written:
      _write_json(os.path.join(out_dir, name), value)
  return sorted(set(written) | {"tokenizer.json", "tokenizer_config.json",
                                "special_tokens_map.json"})


def load_hf_tokenizer_dir(hf_dir: str, kind: str) -> Tokenizer:
  """The `tokenizers.Tokenizer` of a Hugging Face model directory's tokenizer files."""
  hf_json = os.path.join(hf_dir, "tokenizer.json")
  if os.path.isfile(hf_json):
    try:
      return Tokenizer.from_file(hf_json)
    except Exception as e:  # tokenizers raises plain Exceptions for bad JSON
      raise DataError(f"{hf_json} is not a readable tokenizers file ({e})") from e
  config_path = os.path.join(hf_dir, "tokenizer_config.json")
  config = {}
  if os.path.isfile(config_path):
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
  vocab_txt = os.path.join(hf_dir, "vocab.txt")
  vocab_json, merges = os.path.join(hf_dir, "vocab.json"), os.path.join(hf_dir, "merges.txt")
  spiece = os.path.join(hf_dir, T5_SPIECE)
  if kind == "t5" and os.path.isfile(spiece):
    return sentencepiece_to_tokenizer(spiece, "t5")
  if kind == "bert" and os.path.isfile(vocab_txt):
    return _bert_wordpiece(vocab_txt, config)
  if kind == "gpt" and os.path.isfile(vocab_json) and os.path.isfile(merges):
    return byte_level_bpe_tokenizer(vocab_json, merges)
  want = {"bert": "vocab.txt", "t5": T5_SPIECE}.get(kind, "vocab.json and merges.txt")
  raise DataError(f"{hf_dir} has no tokenizer files (tokenizer.json or {want})")


def import_hf_tokenizer(hf_dir: str, out_dir: str, kind: str) -> list[str] | None:
  """Copies a Hugging Face model's tokenizer files into out_dir, adding a tokenizer.json.

  Returns the names written, or None when hf_dir has no tokenizer files.
  """
  present = [n for n in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, n))]
  t5_spm = kind == "t5" and os.path.isfile(os.path.join(hf_dir, T5_SPIECE))
  if not {"tokenizer.json", "vocab.txt", "vocab.json"} & set(present) and not t5_spm:
    return None
  tokenizer = load_hf_tokenizer_dir(hf_dir, kind)
  os.makedirs(out_dir, exist_ok=True)
  for name in present:
    shutil.copyfile(os.path.join(hf_dir, name), os.path.join(out_dir, name))
  if "tokenizer.json" not in present:
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
  return sorted(set(present) | {"tokenizer.json"})
