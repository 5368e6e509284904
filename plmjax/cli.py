"""plmjax: pretrain, fine-tune and export BERT, GPT-2 and T5 in JAX (one subcommand per job).

  plmjax pretrain  --config configs/bert_tiny.py --workdir DIR [--config.a.b=V ...]
  plmjax compile   --config configs/bert_large.py --topology v5e-8 [--out report.json]
  plmjax tokenizer train --input GLOB --vocab-size N --model-type unigram|bpe --out PREFIX
  plmjax export    --workdir DIR --out OUT [--step N] [--dtype float32|bfloat16]
  plmjax import-hf --model HF_DIR --workdir DIR
  plmjax finetune  --config configs/finetune/TASK.py --init DIR --workdir DIR [--config.x=v]
  plmjax predict   --workdir DIR --input FILE
  plmjax generate  --workdir DIR --prompt TEXT [--max-new-tokens N ...]
  plmjax generate  --workdir DIR --input FILE --output OUT.jsonl [--batch-size N] [--num-beams K]
  plmjax data prepare --input SPEC --tokenizer PATH --out DIR [--workers N]
  plmjax embed     --workdir DIR --input FILE --output emb.npy [--pooling mean|cls]
  plmjax fill-mask --workdir DIR "TEXT with [MASK]" [--top-k 5]

Errors caused by input (plmjax.errors.UserError, bad command lines, OSErrors such as a
missing or unwritable path) print one line on stderr and exit 2; `--debug` shows the
traceback. Any other exception is a bug and shows its traceback.
"""

import argparse
import glob
import importlib
import importlib.metadata
import importlib.util
import os
import sys

from plmjax.errors import UserError

# subcommand -> module with `add_arguments(parser)` and `main(args, overrides)`.
COMMANDS = {
    "pretrain": ("plmjax.train.pretrain", "pretrain a BERT, GPT or T5 model"),
    "compile": ("plmjax.train.compile", "compile the train step for a TPU slice: will it fit?"),
    "tokenizer": ("plmjax.data.tokenizer_cli", "train a sentencepiece tokenizer"),
    "export": ("plmjax.export.export", "export a checkpoint to a Hugging Face directory"),
    "import-hf": ("plmjax.export.import_hf", "import a Hugging Face BERT/GPT-2/T5 directory"),
    "finetune": ("plmjax.finetune.finetune",
                 "fine-tune: classify, tag, QA, GPT completion, T5 seq2seq"),
    "predict": ("plmjax.finetune.predict", "predict with a fine-tuned model"),
    "generate": ("plmjax.generate", "generate text with a GPT or T5 model"),
    "data": ("plmjax.data.prepare", "tokenize a corpus once into ArrayRecord shards"),
    "embed": ("plmjax.embed", "sentence embeddings from a BERT model"),
    "fill-mask": ("plmjax.fill_mask", "a BERT model's guesses for [MASK] tokens"),
}


class _Parser(argparse.ArgumentParser):
  """Reports command-line mistakes as a UserError: one line, like every input error."""

  def error(self, message):
    raise UserError(f"{message} (see `{self.prog} --help`)")


def build_parser(argv):
  parser = _Parser(prog="plmjax", description=__doc__.split("\n")[0])
  parser.add_argument("--debug", action="store_true", help="show tracebacks")
  parser.add_argument("--version", action="version", version=f"plmjax {_version()}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  # Import only the module of the command being run (jax imports are slow).
  wanted = next((a for a in argv if a in COMMANDS), None)
  for name, (module_name, help_text) in COMMANDS.items():
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    if name == wanted:
      importlib.import_module(module_name).add_arguments(p)
  return parser


def _version() -> str:
  try:
    return importlib.metadata.version("plmjax")
  except importlib.metadata.PackageNotFoundError:
    return "unknown (not installed)"


def main(argv=None, hooks=()):
  """Runs one command. `hooks` (plmjax.train.hooks.Hook objects) are added to the
  training loop of `pretrain` and `finetune`, e.g. a profiler or an experiment tracker."""
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv
  try:
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if a.startswith("--config.")]
    unknown = [a for a in extra if not a.startswith("--config.")]
    if unknown:
      parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    _leave_out_absent_accelerators()
    module = importlib.import_module(COMMANDS[args.command][0])
    _parse_absl_flags()
    if hooks:
      return module.main(args, overrides, hooks=hooks) or 0
    return module.main(args, overrides) or 0
  except UserError as e:
    if debug:
      raise
    print(f"plmjax: error: {_one_line(e)}", file=sys.stderr)
    return 2
  except OSError as e:  # the environment, not plmjax: a path that is missing, unwritable, ...
    if debug:
      raise
    print(f"plmjax: error: {_one_line(e)} (--debug shows the traceback)", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("plmjax: interrupted", file=sys.stderr)
    return 130


def _leave_out_absent_accelerators():
  """With libtpu (the tpu extra) or jax's CUDA plugin installed on a machine without that
  hardware, jax would try the backend and the library would print warnings on stderr:
  use the accelerators that are there, and the CPU, unless JAX_PLATFORMS says otherwise.
  `plmjax compile` still compiles for TPU slices and GPUs that are not attached."""
  if os.environ.get("JAX_PLATFORMS"):
    return
  libtpu = importlib.util.find_spec("libtpu") is not None
  cuda = importlib.util.find_spec("jax_cuda12_plugin") is not None
  if not (libtpu or cuda):
    return
  has_tpu = libtpu and bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))
  has_gpu = bool(glob.glob("/dev/nvidia[0-9]*"))
  if (has_tpu or not libtpu) and (has_gpu or not cuda):
    return  # nothing installed that lacks its hardware: jax's own choice
  platforms = ["tpu"] * has_tpu + ["cuda"] * has_gpu + ["cpu"]
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", ",".join(platforms))


def _parse_absl_flags():
  """This program's absl flags (none of its own): grain's data worker processes read
  theirs (config.data.num_workers > 0), as under absl.app.run."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1], known_only=True)


def _one_line(e: Exception) -> str:
  return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
  sys.exit(main())
