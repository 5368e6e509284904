"""`plmjax pretrain`: config -> tokenizer -> data -> model -> Trainer.

  plmjax pretrain --config configs/bert_tiny.py --workdir runs/bert_tiny [--config.a.b=V ...]

Starting again with the same workdir resumes from its newest checkpoint. Bad input
(config, data, tokenizer, workdir) is reported before anything in the workdir is written.
"""

import filecmp
import os
import shutil

import jax

from plmjax import config as config_lib
from plmjax.data import pipeline, sources
from plmjax.data.tokenizer import check_vocab, load_tokenizer, train_tokenizer
from plmjax.errors import CheckpointError, DataError, UserError
from plmjax.models import build_model
from plmjax.train import checkpoint, distributed
from plmjax.train.flops import flops_per_token
from plmjax.train.objectives import PRETRAINING
from plmjax.train.trainer import Trainer


def add_arguments(parser):
  parser.add_argument("--config", required=True, help="config file, e.g. configs/bert_tiny.py")
  parser.add_argument("--workdir", required=True,
                      help="checkpoints, tokenizer, metrics.jsonl, TensorBoard events")
  parser.epilog = "Override any config key with --config.KEY=VALUE, e.g. --config.train.steps=100"


def main(args, overrides):
  config = config_lib.load_config(args.config, overrides)
  distributed.initialize_from_env()
  result = run(config, args.workdir)
  signals = {"SIGINT": 2, "SIGTERM": 15}
  if result.stopped_by in signals:  # preempted: the conventional 128 + signal number
    return 128 + signals[result.stopped_by]
  return 0


def prepare_tokenizer(config, workdir: str):
  """The run's tokenizer: given, already in DIR/tokenizer/, or trained into it."""
  dst = checkpoint.tokenizer_subdir(workdir)
  arch = config.model.arch
  if config.data.tokenizer:
    given = load_tokenizer(config.data.tokenizer)  # copied into the workdir by `run`
    if os.path.isdir(dst) and os.listdir(dst):
      _check_same_tokenizer(load_tokenizer(dst), given, workdir)
    return given
  if os.path.isdir(dst) and os.listdir(dst):
    return load_tokenizer(dst)
  prefix = os.path.join(dst, "tokenizer")
  if jax.process_index() == 0:
    print(f"plmjax: training a {config.data.tokenizer_model_type} tokenizer "
          f"(vocab {config.model.vocab_size}) on {config.data.train} -> {prefix}.model", flush=True)
    docs = sources.read_documents(config.data.train,
                                  tfds_data_dir=config.data.tfds_data_dir or None)
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    train_tokenizer((line for doc in docs for line in doc), config.model.vocab_size,
                    config.data.tokenizer_model_type, os.path.join(tmp, "tokenizer"), kind=arch)
    os.replace(tmp, dst)
  _sync("tokenizer")
  return load_tokenizer(dst)


def _check_same_tokenizer(saved, given, workdir: str):
  """A workdir keeps the tokenizer it started with: ids mean nothing under another one."""
  if not filecmp.cmp(saved.path, given.path, shallow=False):
    raise DataError(
        f"config.data.tokenizer={given.path} differs from {saved.path}, the tokenizer this "
        f"workdir ({workdir}) was trained with, so its token ids would mean different pieces; "
        f"set config.data.tokenizer={saved.path} (or leave it empty) to continue this run, or "
        "start a new --workdir for the new tokenizer")


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def run(config, workdir: str):
  """Pretrains (or resumes) in `workdir`; returns the Trainer's Result.

  Config, workdir, tokenizer and data are all checked before the workdir is written
  (a tokenizer trained for a new workdir is the one exception: it only adds files).
  """
  config_lib.check_config_keys(config)
  model_cfg = config_lib.validate(config)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise CheckpointError(f"--workdir {workdir} exists and is not a directory")
  checkpoint.check_same_model(workdir, config)
  if not config.data.train:
    raise UserError("config.data.train is empty; set it to a file glob, "
                    "tfds:NAME[/CONFIG]:SPLIT or builtin:python-docs")
  tokenizer = prepare_tokenizer(config, workdir)
  check_vocab(tokenizer, model_cfg.vocab_size)

  n_proc, proc = jax.process_count(), jax.process_index()
  local_batch = config.train.batch_size // n_proc

  def make_iter(split):
    return pipeline.make_pretrain_iterator(config, tokenizer, split=split, batch_size=local_batch,
                                           process_index=proc, process_count=n_proc)

  train_iter = make_iter("train")
  first_state = train_iter.get_state()
  example = next(train_iter)
  train_iter.set_state(first_state)
  make_eval = None
  if config.data.eval:  # tokenised once; every evaluation replays the same batches
    eval_iter = make_iter("eval")
    eval_start = eval_iter.get_state()

    def replay_eval():
      eval_iter.set_state(eval_start)
      return eval_iter
    make_eval = replay_eval

  seq_len = config.data.max_seq_len
  masked = config.data.max_predictions_per_seq if model_cfg.arch == "bert" else None
  model = build_model(model_cfg, config.task.head)
  trainer = Trainer(config, workdir, model, PRETRAINING[model_cfg.arch], example,
                    flops_per_token=flops_per_token(model_cfg, seq_len, masked),
                    tokens_per_example=seq_len)  # checks mesh and batch: still nothing written

  if proc == 0:
    os.makedirs(workdir, exist_ok=True)
    dst = checkpoint.tokenizer_subdir(workdir)
    if config.data.tokenizer and not os.path.isdir(dst):
      tokenizer.save(dst)
    checkpoint.write_config(workdir, config)
  return trainer.fit(train_iter, make_eval, desc="pretrain")
