"""`plmjax tokenizer train`: train a sentencepiece tokenizer.

  plmjax tokenizer train --input 'corpus/*.txt' --vocab-size 8000 --model-type unigram \\
      --out tok/spm [--kind bert|gpt|t5] [--max-sentences N]

--input takes the same forms as config.data.train (glob, tfds:NAME:SPLIT,
builtin:python-docs). Writes OUT.model and OUT.vocab. The same input and flags
give the same model. --kind t5: --vocab-size counts T5's 100 sentinels, which sit above
the sentencepiece pieces (OUT.vocab lists the pieces only).
"""

import argparse

from plmjax.data import tokenizer, tokenizer_train
from plmjax.errors import UserError


def add_arguments(parser: argparse.ArgumentParser):
  sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
  p = sub.add_parser("train", help="train a sentencepiece model",
                     description=__doc__.split("\n")[0])
  p.add_argument("--input", required=True,
                 help="glob of .txt/.jsonl files, tfds:NAME[/CONFIG]:SPLIT or builtin:python-docs")
  p.add_argument("--vocab-size", type=int, required=True, help="pieces, specials included")
  p.add_argument("--model-type", choices=tokenizer.MODEL_TYPES, default="unigram")
  p.add_argument("--out", required=True, help="output prefix: writes PREFIX.model, PREFIX.vocab")
  p.add_argument("--kind", choices=tokenizer.KINDS, default="bert",
                 help="special tokens: bert ([PAD]=0 [UNK] [CLS] [SEP] [MASK]), gpt "
                      "(<|endoftext|>=0 <unk>) or t5 (<pad>=0 </s> <unk>, 100 sentinels "
                      "<extra_id_0>.. at the top)")
  p.add_argument("--max-sentences", type=int, default=2_000_000,
                 help="train on the first N segments of the input")
  p.add_argument("--character-coverage", type=float, default=0.9995)
  p.add_argument("--byte-fallback", action="store_true",
                 help="spell unknown characters as UTF-8 bytes instead of <unk>")
  p.add_argument("--tfds-data-dir", default=None, help="data_dir for tfds: inputs")
  p.add_argument("--verbose", action="store_true", help="show sentencepiece's log")
  p.add_argument("--debug", action="store_true", help="show tracebacks")


def main(args: argparse.Namespace, overrides: list[str]) -> int:
  if overrides:
    raise UserError(f"`plmjax tokenizer` takes no config overrides (got {' '.join(overrides)})")
  if args.vocab_size <= 0:
    raise UserError(f"--vocab-size {args.vocab_size} must be positive")
  path = tokenizer_train.train_tokenizer(
      args.input, args.vocab_size, args.model_type, args.out, kind=args.kind,
      max_sentences=args.max_sentences, character_coverage=args.character_coverage,
      byte_fallback=args.byte_fallback, tfds_data_dir=args.tfds_data_dir, verbose=args.verbose,
      key="--input")
  tok = tokenizer.load_tokenizer(path)
  print(f"wrote {path} and {args.out}.vocab ({tok.vocab_size} pieces, {tok.kind} special tokens)")
  return 0
