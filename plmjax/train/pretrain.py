"""`plmjax pretrain`: config -> tokenizer -> data -> model -> Trainer.fit.

  plmjax pretrain --config configs/bert_tiny.py --workdir runs/bert_tiny [--config.a.b=V ...]

Starting again with the same workdir resumes from its newest checkpoint. Every check
that can fail (config, mesh, workdir, tokenizer, data) runs before the workdir is
written; a tokenizer trained for a new workdir is removed again if a later check fails.
"""

import contextlib
import filecmp
import os
import shutil

import jax

from plmjax import config as config_lib
from plmjax import workdir as workdir_lib
from plmjax.data import pipeline, sources
from plmjax.data.tokenizer import check_vocab, load_tokenizer, train_tokenizer
from plmjax.errors import DataError, UserError
from plmjax.models import build_model
from plmjax.train import distributed, sharding
from plmjax.train.flops import flops_per_token
from plmjax.train.hooks import StopSignals
from plmjax.train.objectives import PRETRAINING
from plmjax.train.trainer import Trainer


def add_arguments(parser):
  parser.add_argument("--config", required=True, help="config file, e.g. configs/bert_tiny.py")
  parser.add_argument("--workdir", required=True,
                      help="checkpoints, tokenizer, metrics.jsonl, TensorBoard events")
  parser.add_argument("--print-config", action="store_true",
                      help="print the full resolved config as JSON and exit")
  parser.epilog = "Override any config key with --config.KEY=VALUE, e.g. --config.train.steps=100"


def main(args, overrides, hooks=()):
  config = config_lib.load_config(args.config, overrides)
  if args.print_config:
    config_lib.validate(config)
    print(config.to_json(indent=2))
    return 0
  distributed.initialize_from_env()
  with StopSignals() as signals:  # after jax.distributed: its own SIGTERM notifier yields
    result = run(config, args.workdir, signals=signals, hooks=hooks)
  if result.stop_signal:
    return 128 + result.stop_signal
  if jax.process_index() == 0 and not result.stopped_by:
    print(closing_line(result, args.workdir, config.model.arch), flush=True)
  return 0


def closing_line(result, workdir: str, arch: str) -> str:
  m, s = divmod(int(result.seconds), 60)
  parts = [f"plmjax: done: step {result.step} ({m} min {s} s in this run)"]
  for split, metrics in (("train", result.train_metrics), ("eval", result.eval_metrics)):
    keys = [k for k in ("loss", "mlm_accuracy", "nsp_accuracy", "accuracy", "perplexity",
                        "mlm_perplexity") if k in metrics]
    if keys:
      parts.append(f"{split} " + ", ".join(f"{k} {metrics[k]:.4g}" for k in keys))
  parts.append(f"checkpoint {os.path.join(result.checkpoint_dir, str(result.step))}")
  nxt = [f"plmjax export --workdir {workdir} --out {workdir}/hf"]
  nxt.append(f"plmjax finetune --config configs/finetune/sst2.py --init {workdir} "
             "--workdir runs/sst2" if arch == "bert"
             else f"plmjax generate --workdir {workdir} --prompt 'Once upon a time'")
  return "; ".join(parts) + "\nnext: " + "  |  ".join(nxt)


def _prepare_tokenizer(config, workdir: str):
  """The run's tokenizer: given, already in DIR/tokenizer/, or trained into it."""
  dst = workdir_lib.tokenizer_dir(workdir)
  if config.data.tokenizer:
    given = load_tokenizer(config.data.tokenizer)  # copied into the workdir by `run`
    if workdir_lib.has_tokenizer(workdir):
      _check_same_tokenizer(load_tokenizer(dst), given, workdir)
    return given
  if workdir_lib.has_tokenizer(workdir):
    return load_tokenizer(dst)
  if jax.process_index() == 0:
    print(f"plmjax: training a {config.data.tokenizer_model_type} tokenizer "
          f"(vocab {config.model.vocab_size}) on {config.data.train} -> {dst}/", flush=True)
    docs = sources.read_documents(config.data.train,
                                  tfds_data_dir=config.data.tfds_data_dir or None)
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
      train_tokenizer((line for doc in docs for line in doc), config.model.vocab_size,
                      config.data.tokenizer_model_type, os.path.join(tmp, "tokenizer"),
                      kind=config.model.arch, vocab_key="config.model.vocab_size")
    finally:
      if not os.path.isfile(os.path.join(tmp, "tokenizer.model")):
        shutil.rmtree(tmp, ignore_errors=True)
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


@contextlib.contextmanager
def _undo_on_error(workdir: str):
  """Removes what the start-up wrote (a new workdir, a trained tokenizer) if it fails."""
  new_workdir = not os.path.exists(workdir)
  new_tokenizer = not workdir_lib.has_tokenizer(workdir)
  try:
    yield
  except BaseException:
    if jax.process_index() == 0:
      if new_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
      elif new_tokenizer:
        shutil.rmtree(workdir_lib.tokenizer_dir(workdir), ignore_errors=True)
    raise


def _notices(config):
  d = config.data
  if d.eval.startswith("builtin:") and not d.train.startswith("builtin:"):
    print(f"plmjax: note: training on {d.train} but evaluating on the built-in {d.eval}; "
          "set config.data.eval to held-out text of your own corpus (or '' for no evaluation)",
          flush=True)


def run(config, workdir: str, *, signals: StopSignals | None = None, hooks=()):
  """Pretrains (or resumes) in `workdir`; returns the Trainer's Result."""
  config_lib.check_config_keys(config)
  model_cfg = config_lib.validate(config)
  workdir_lib.check_usable(workdir, config)
  if not config.data.train:
    raise UserError("config.data.train is empty; set it to a file glob, "
                    "tfds:NAME[/CONFIG]:SPLIT or builtin:python-docs")
  proc0 = jax.process_index() == 0
  if proc0:
    print(config_lib.summary(config), flush=True)
    _notices(config)
  mesh = sharding.make_mesh(config.mesh)  # mesh and batch errors before any tokenizer work
  sharding.check_batch(config.train.batch_size, config.train.grad_accum_steps, mesh)

  with _undo_on_error(workdir):
    tokenizer = _prepare_tokenizer(config, workdir)
    check_vocab(tokenizer, model_cfg.vocab_size)
    trainer, train_iter, evaluate = _build(config, model_cfg, tokenizer, workdir)
  if proc0:  # everything checked: now the workdir is written
    os.makedirs(workdir, exist_ok=True)
    if config.data.tokenizer and not workdir_lib.has_tokenizer(workdir):
      tokenizer.save(workdir_lib.tokenizer_dir(workdir))
    workdir_lib.write_config(workdir, config)
  every = config.train.eval_every_steps
  return trainer.fit(train_iter, evaluate=evaluate, eval_due=lambda step: every > 0 and
                     step % every == 0, signals=signals, hooks=hooks, desc="pretrain")


def _build(config, model_cfg, tokenizer, workdir):
  n_proc, proc = jax.process_count(), jax.process_index()
  local_batch = config.train.batch_size // n_proc

  def make_iter(split):
    return pipeline.make_pretrain_iterator(config, tokenizer, split=split, batch_size=local_batch,
                                           process_index=proc, process_count=n_proc)

  train_iter = make_iter("train")
  first_state = train_iter.get_state()
  example = next(train_iter)
  train_iter.set_state(first_state)
  seq_len = config.data.max_seq_len
  masked = config.data.max_predictions_per_seq if model_cfg.arch == "bert" else None
  trainer = Trainer(config, workdir, build_model(model_cfg, config.task.head),
                    PRETRAINING[model_cfg.arch], example,
                    flops_per_token=flops_per_token(model_cfg, seq_len, masked),
                    tokens_per_example=seq_len)
  evaluate = None
  if config.data.eval:  # tokenised once; every evaluation replays the same batches
    eval_iter = make_iter("eval")
    eval_start = eval_iter.get_state()

    def evaluate(params):
      eval_iter.set_state(eval_start)
      return trainer.evaluate(params, eval_iter, config.train.eval_steps)
  return trainer, train_iter, evaluate
