"""Training a sentencepiece tokenizer (`plmjax tokenizer train`) with the special-token
layouts that plmjax.data.tokenizer reads (its module docstring lists them)."""

import io
import os
import re
from collections.abc import Iterable

import sentencepiece as spm

from plmjax.data.tokenizer import EOT, KINDS, MODEL_TYPES, T5_NUM_SENTINELS
from plmjax.errors import DataError


# sentencepiece trainer flags that give the layouts in the module docstring.
_SPECIALS = {
    "bert": dict(pad_id=0, pad_piece="[PAD]", unk_id=1, unk_piece="[UNK]", bos_id=-1, eos_id=-1,
                 control_symbols=["[CLS]", "[SEP]", "[MASK]"]),
    "gpt": dict(eos_id=0, eos_piece=EOT, unk_id=1, unk_piece="<unk>", bos_id=-1, pad_id=-1),
    "t5": dict(pad_id=0, pad_piece="<pad>", eos_id=1, eos_piece="</s>", unk_id=2,
               unk_piece="<unk>", bos_id=-1),
}


def train_tokenizer(texts_or_files, vocab_size: int, model_type: str = "unigram",
                    out_prefix: str = "tokenizer", kind: str = "bert", *,
                    max_sentences: int = 2_000_000, character_coverage: float = 0.9995,
                    byte_fallback: bool = False, tfds_data_dir: str | None = None,
                    num_threads: int = 4, verbose: bool = False,
                    key: str = "tokenizer input", vocab_key: str = "--vocab-size") -> str:
  """Trains a sentencepiece model; writes OUT_PREFIX.model/.vocab; returns the .model path.

  `texts_or_files`: a source spec string (glob of .txt/.jsonl, tfds:NAME:SPLIT,
  builtin:python-docs), a list of `os.PathLike` files, or an iterable of texts.
  The first `max_sentences` segments are used, and the number of trainer threads
  is a setting (unigram's EM sums in per-thread order), not the machine's core
  count, so the same input and settings give the same bytes on any machine.
  `key` names the input and `vocab_key` the vocabulary size in error messages.
  kind='t5': vocab_size counts the 100 sentinels, which the .model does not hold.
  """
  from plmjax.data import sources  # pylint: disable=g-import-not-at-top

  if model_type not in MODEL_TYPES:
    raise DataError(f"model type {model_type!r} is not allowed; use unigram or bpe")
  if kind not in KINDS:
    raise DataError(f"tokenizer kind {kind!r} is not allowed; use bert, gpt or t5")
  pieces_size = vocab_size - (T5_NUM_SENTINELS if kind == "t5" else 0)
  if pieces_size < 4:
    raise DataError(f"{vocab_key} {vocab_size} is too small: a t5 tokenizer holds "
                    f"{T5_NUM_SENTINELS} sentinels and <pad> </s> <unk> besides its pieces")
  if isinstance(texts_or_files, (str, os.PathLike)) and not isinstance(texts_or_files, str):
    texts_or_files = [texts_or_files]
  if isinstance(texts_or_files, str):
    docs = sources.read_documents(texts_or_files, tfds_data_dir=tfds_data_dir, key=key)
    sentences = (s for doc in docs for s in doc)
  elif isinstance(texts_or_files, (list, tuple)) and texts_or_files and all(
      isinstance(f, os.PathLike) for f in texts_or_files):
    docs = sources.read_files([os.fspath(f) for f in texts_or_files])
    sentences = (s for doc in docs for s in doc)
  else:
    sentences = (line.strip() for text in texts_or_files for line in text.split("\n"))
  sentences = _take(sentences, max_sentences)
  if not sentences:
    raise DataError(f"{key}: no text to train the tokenizer on")
  args = dict(_SPECIALS[kind])
  args.update(model_type=model_type, vocab_size=pieces_size, character_coverage=character_coverage,
              byte_fallback=byte_fallback, input_sentence_size=0, max_sentence_length=1 << 16,
              num_threads=num_threads, minloglevel=0 if verbose else 2)
  model = io.BytesIO()  # no model_prefix in the trainer spec: same bytes wherever it is written
  try:
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(sentences), model_writer=model, **args)
  except RuntimeError as e:
    raise _training_error(e, vocab_size, vocab_key, vocab_size - pieces_size) from e
  out_prefix = os.fspath(out_prefix)
  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
  vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i) + 0.0:g}\n"  # + 0.0: no "-0"
                  for i in range(sp.get_piece_size()))
  try:
    with open(out_prefix + ".model", "wb") as f:
      f.write(model.getvalue())
    with open(out_prefix + ".vocab", "w", encoding="utf-8") as f:
      f.write(vocab)
  except BaseException:  # no .model without its .vocab, no half-written file
    for path in (out_prefix + ".model", out_prefix + ".vocab"):
      if os.path.exists(path):
        os.remove(path)
    raise
  return out_prefix + ".model"


def _training_error(e: RuntimeError, vocab_size: int, vocab_key: str,
                    extra: int = 0) -> DataError:
  """sentencepiece's error, in terms of the flag or config key that set the size."""
  sep = " " if vocab_key.startswith("-") else "="  # "--vocab-size 8000", "config...=8000"
  setting = f"{vocab_key}{sep}{vocab_size}"
  most = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", str(e))
  if most:
    return DataError(f"{setting} is too large for this corpus: sentencepiece can make at most "
                     f"{int(most[1]) + extra} pieces from it; lower {vocab_key} or add text")
  first = str(e).strip().split("\n")[0]
  return DataError(f"sentencepiece training failed for {setting}: {first}")


def _take(items: Iterable[str], n: int) -> list[str]:
  out = []
  for s in items:
    if s:
      out.append(s)
      if len(out) >= n:
        break
  return out

