"""`plmjax pretrain`: config -> tokenizer -> data -> model -> Trainer.fit.

  plmjax pretrain --config configs/bert_tiny.py --workdir runs/bert_tiny [--config.a.b=V ...]
  plmjax pretrain --config configs/bert_base.py --workdir runs/p2 --init runs/p1  # continue

Starting again with the same workdir resumes from its newest checkpoint. With --init DIR
a new run starts from the weights of DIR (pretrain or import-hf output) and its tokenizer,
with a fresh optimizer, schedule and data position; DIR is recorded in WORKDIR/init.json,
and once the run has a checkpoint of its own it resumes from that, not from DIR. Every
check that can fail (config, mesh, workdir, --init, tokenizer, data) runs before the
workdir is written; a tokenizer trained for a new workdir is removed again if a later
check fails.
"""

import contextlib
import filecmp
import os
import shutil

import jax

from plmjax import config as config_lib
from plmjax import workdir as workdir_lib
from plmjax.data import pipeline, sources
from plmjax.data.tokenizer import check_vocab, load_tokenizer
from plmjax.data.tokenizer_train import train_tokenizer
from plmjax.errors import ConfigError, DataError, UserError
from plmjax.models import build_model
from plmjax.train import distributed, sharding
from plmjax.train import state as state_lib
from plmjax.train.flops import pretrain_flops
from plmjax.train.hooks import StopSignals
from plmjax.train.objectives import PRETRAINING
from plmjax.train.trainer import Trainer


def add_arguments(parser):
  parser.add_argument("--config", required=True, help="config file, e.g. configs/bert_tiny.py")
  parser.add_argument("--workdir", required=True,
                      help="checkpoints, tokenizer, metrics.jsonl, TensorBoard events")
  parser.add_argument("--init", metavar="DIR", default=None,
                      help="start from the weights and tokenizer of another workdir (pretrain "
                           "or import-hf output), with a fresh optimizer, schedule and data "
                           "position; a workdir with checkpoints of its own resumes from them")
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
    result = run(config, args.workdir, init=args.init, signals=signals, hooks=hooks)
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
  if arch == "bert":
    nxt.append(f"plmjax finetune --config configs/finetune/sst2.py --init {workdir} "
               "--workdir runs/sst2")
  elif arch == "gpt":
    nxt.append(f"plmjax generate --workdir {workdir} --prompt 'Once upon a time'")
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


def _init_tokenizer(config, init: str, workdir: str):
  """--init's tokenizer (config.data.tokenizer may name the same one), or the config's
  when --init has none (an import-hf of a model without tokenizer files)."""
  given = load_tokenizer(config.data.tokenizer) if config.data.tokenizer else None
  if workdir_lib.has_tokenizer(init):
    tokenizer = load_tokenizer(workdir_lib.tokenizer_dir(init))
    if given is not None and not _same_tokenizer(tokenizer, given):
      raise DataError(
          f"config.data.tokenizer={given.path} is not the tokenizer of --init {init} "
          f"({tokenizer.path}), whose weights belong to that one's token ids; leave "
          "config.data.tokenizer empty to continue with it")
  elif given is not None:
    tokenizer = given
  else:
    raise DataError(f"--init {init} has no tokenizer ({workdir_lib.tokenizer_dir(init)}/ is "
                    "missing or empty); set config.data.tokenizer to the one its weights were "
                    "trained with")
  if workdir_lib.has_tokenizer(workdir):
    _check_same_tokenizer(load_tokenizer(workdir_lib.tokenizer_dir(workdir)), tokenizer, workdir)
  return tokenizer


def _same_tokenizer(a, b) -> bool:
  """The same file, or the same piece at every id (a vocab.txt and its tokenizer.json)."""
  if filecmp.cmp(a.path, b.path, shallow=False):
    return True
  return a.vocab_size == b.vocab_size and _pieces(a) == _pieces(b)


def _pieces(tokenizer) -> list[str]:
  return [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]


def _check_same_tokenizer(saved, given, workdir: str):
  """A workdir keeps the tokenizer it started with: ids mean nothing under another one."""
  if not _same_tokenizer(saved, given):
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


def _init_source(config, workdir: str, init: str | None) -> tuple[str | None, int | None]:
  """(DIR, step) to take the first weights from: --init, else the workdir's init.json;
  (None, None) when the workdir has checkpoints of its own (they win) or neither is set."""
  steps = workdir_lib.checkpoint_steps(workdir, config)
  if steps:
    if init and jax.process_index() == 0:
      print(f"plmjax: {workdir} has checkpoints of its own (newest: step {max(steps)}): "
            f"resuming from them; --init {init} is not used", flush=True)
    return None, None
  if init:
    return init, None
  recorded = workdir_lib.read_init(workdir)
  if recorded is None:
    return None, None
  if jax.process_index() == 0:
    print(f"plmjax: starting from {recorded['init']} (step {recorded['step']}), the --init "
          f"recorded in {workdir_lib.init_path(workdir)}", flush=True)
  return recorded["init"], int(recorded["step"])


def _load_init(config, model_cfg, init: str, step: int | None):
  """(params, step) of --init for this config's model; shapes checked before any data work."""
  theirs = workdir_lib.read_config(init).model
  if theirs.get("arch") != model_cfg.arch:
    raise ConfigError(f"--init {init} holds a {theirs.get('arch')!r} model but "
                      f"config.model.arch={model_cfg.arch!r}; use a {theirs.get('arch')} config")
  diffs = [f"config.model.{k}={workdir_lib.model_key(theirs, k)!r}" for k in workdir_lib.SHAPE_KEYS
           if workdir_lib.model_key(theirs, k) != workdir_lib.model_key(config.model, k)]
  hint = f"; set {', '.join(diffs)} as in {workdir_lib.config_path(init)}" if diffs else ""
  eps = theirs.get("layer_norm_eps")
  if eps is not None and eps != model_cfg.layer_norm_eps and jax.process_index() == 0:
    print(f"plmjax: note: config.model.layer_norm_eps={model_cfg.layer_norm_eps:g} but --init "
          f"{init} has {eps:g}", flush=True)
  model = build_model(model_cfg, config.task.head)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype)
           for k, (shape, dtype) in pipeline.batch_spec(config, 1).items()}
  return state_lib.params_from_workdir(init, state_lib.abstract_params(model, batch),
                                       model_cfg.initializer_range, config.train.seed,
                                       step=step, hint=hint)


def run(config, workdir: str, *, init: str | None = None, signals: StopSignals | None = None,
        hooks=()):
  """Pretrains (or resumes) in `workdir`, from --init's weights if `init` is a workdir;
  returns the Trainer's Result."""
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
  init, init_step = _init_source(config, workdir, init)
  init_params = None
  if init:
    loaded = {}
    loaded["params"], init_step = _load_init(config, model_cfg, init, init_step)
    init_params = lambda abstract: loaded.pop("params")  # the host copy goes once on device

  with _undo_on_error(workdir):
    if init:
      tokenizer = _init_tokenizer(config, init, workdir)
    else:
      tokenizer = _prepare_tokenizer(config, workdir)
    check_vocab(tokenizer, model_cfg.vocab_size)
    trainer, train_iter, evaluate = _build(config, model_cfg, tokenizer, workdir, init_params)
  if proc0:  # everything checked: now the workdir is written
    os.makedirs(workdir, exist_ok=True)
    if not workdir_lib.has_tokenizer(workdir):
      if init and workdir_lib.has_tokenizer(init):  # all its files, for export
        shutil.copytree(workdir_lib.tokenizer_dir(init), workdir_lib.tokenizer_dir(workdir),
                        dirs_exist_ok=True)
      elif config.data.tokenizer:
        tokenizer.save(workdir_lib.tokenizer_dir(workdir))
    if init:
      workdir_lib.write_init(workdir, init, init_step)
    workdir_lib.write_config(workdir, config)
  every = config.train.eval_every_steps
  return trainer.fit(train_iter, evaluate=evaluate, eval_due=lambda step: every > 0 and
                     step % every == 0, signals=signals, hooks=hooks, desc="pretrain")


def _build(config, model_cfg, tokenizer, workdir, init_params=None):
  n_proc, proc = jax.process_count(), jax.process_index()
  local_batch = config.train.batch_size // n_proc

  def make_iter(split):
    return pipeline.make_pretrain_iterator(config, tokenizer, split=split, batch_size=local_batch,
                                           process_index=proc, process_count=n_proc,
                                           cache_dir=os.path.join(workdir, "data_cache"))

  train_iter = make_iter("train")
  first_state = train_iter.get_state()
  example = next(train_iter)
  train_iter.set_state(first_state)
  tokens, flops = pretrain_flops(config, model_cfg)
  trainer = Trainer(config, workdir, build_model(model_cfg, config.task.head),
                    PRETRAINING[model_cfg.arch], example, flops_per_token=flops,
                    tokens_per_example=tokens, init_params=init_params)
  evaluate = None
  if config.data.eval:  # tokenised once; every evaluation replays the same batches
    eval_iter = make_iter("eval")
    eval_start = eval_iter.get_state()

    def evaluate(params):
      eval_iter.set_state(eval_start)
      return trainer.evaluate(params, eval_iter, config.train.eval_steps)
  return trainer, train_iter, evaluate
