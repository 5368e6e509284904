"""`plmjax finetune`: a pretrained (or imported) workdir -> a task model.

  plmjax finetune --config configs/finetune/sst2.py --init runs/bert_base --workdir runs/sst2
  plmjax finetune --config configs/finetune/completion.py --init runs/gpt2_small \
      --workdir runs/completion --config.data.train=train.jsonl --config.data.eval=dev.jsonl
  plmjax finetune --config configs/finetune/seq2seq.py --init runs/t5_small \
      --workdir runs/seq2seq --config.data.train=train.jsonl --config.data.eval=dev.jsonl

The model's shape keys and the tokenizer come from --init; the encoder weights are
copied from its newest checkpoint and the task head starts fresh (BERT tasks). A
completion task fine-tunes a GPT with its own LM head, so its workdir stays a GPT LM
workdir (generate, export as GPT2LMHeadModel); a seq2seq task likewise fine-tunes the whole
T5 (export as T5ForConditionalGeneration). Training is one
Trainer.fit, as pretraining's (sharding, checkpoints, metrics.jsonl, TensorBoard), with an
evaluation hook over the whole validation set at each epoch end (or every
train.eval_every_steps); DIR/eval_results.json holds the final metrics. Running the same
command again resumes.
"""

import json
import os

import jax
import numpy as np

from plmjax import config as config_lib
from plmjax import workdir as workdir_lib
from plmjax.data.tokenizer import check_vocab, load_tokenizer
from plmjax.errors import ConfigError
from plmjax.finetune import completion, data, features, predict, seq2seq, tasks
from plmjax.models import build_model, t5
from plmjax.train import distributed, sharding
from plmjax.train import state as state_lib
from plmjax.train.flops import flops_per_token
from plmjax.train.hooks import StopSignals
from plmjax.train.step import model_inputs
from plmjax.train.trainer import Trainer

# config.model keys that stay as the fine-tuning config sets them (not taken from --init).
OWN_MODEL_KEYS = ("dropout_rate", "attention_dropout_rate", "num_labels")


def add_arguments(parser):
  parser.add_argument("--config", required=True, help="e.g. configs/finetune/sst2.py")
  parser.add_argument("--init", required=True,
                      help="plmjax workdir to start from (pretrain or import-hf output)")
  parser.add_argument("--workdir", required=True, help="where the fine-tuned model goes")
  parser.add_argument("--print-config", action="store_true",
                      help="print the full resolved config as JSON and exit")
  parser.epilog = "Override any config key with --config.KEY=VALUE, e.g. --config.train.epochs=2"


def main(args, overrides, hooks=()):
  config = config_lib.load_config(args.config, [], reference=_reference)
  if args.print_config:
    prepare_config(config, args.init, overrides)
    print(config.to_json(indent=2))
    return 0
  distributed.initialize_from_env()
  with StopSignals() as signals:  # after jax.distributed: its own SIGTERM notifier yields
    result = run(config, args.init, args.workdir, overrides, signals=signals, hooks=hooks)
  if result.stop_signal:
    return 128 + result.stop_signal
  if jax.process_index() == 0 and not result.stopped_by:
    print(closing_line(result, args.workdir), flush=True)
  return 0


def _reference(config):
  """The keys a fine-tuning config may have: finetune_config()'s for its task type."""
  if "task" in config and "type" in config.task and config.task.type in tasks.HEADS:
    return tasks.finetune_config(type=config.task.type)
  return None


def closing_line(result, workdir: str) -> str:
  m, s = divmod(int(result.seconds), 60)
  parts = [f"plmjax: done: step {result.step} ({m} min {s} s in this run)"]
  if result.train_metrics:
    parts.append("train loss " + f"{result.train_metrics['loss']:.4g}")
  if result.eval_metrics:
    parts.append("eval " + ", ".join(f"{k} {v:.4g}" for k, v in result.eval_metrics.items()))
  parts.append(f"checkpoint {os.path.join(result.checkpoint_dir, str(result.step))}; "
               f"results {os.path.join(workdir, 'eval_results.json')}")
  return ("; ".join(parts) + f"\nnext: plmjax predict --workdir {workdir} --input FILE.jsonl"
          f"  |  plmjax export --workdir {workdir} --out {workdir}/hf")


def prepare_config(config, init: str, overrides=()):
  """The model section from --init, num_labels from the task, then the overrides."""
  if "task" not in config or "type" not in config.task:
    raise ConfigError("the config has no config.task.type; start fine-tuning configs from "
                      "plmjax.finetune.tasks.finetune_config (see configs/finetune/)")
  init_model = workdir_lib.read_config(init).model
  tasks.check_task_type(config.task)
  want = tasks.ARCHS[config.task.type]
  if init_model.get("arch") != want:
    raise ConfigError(f"--init {init} holds a {init_model.get('arch')!r} model; a "
                      f"{config.task.type} task fine-tunes a {want!r} model"
                      + (" (GPT: configs/finetune/completion.py, T5: configs/finetune/"
                         "seq2seq.py)" if want == "bert" else ""))
  for key, value in init_model.items():
    if key not in OWN_MODEL_KEYS and key in config.model:
      config.model[key] = value
  config_lib.apply_overrides(config, list(overrides))
  tasks.check_task_type(config.task)
  config.task.head = tasks.HEADS[config.task.type]
  config.model.num_labels = tasks.num_labels(config.task)
  tasks.check_task(config.task)
  return config


def pretrained_params(init: str, model_cfg, seed: int = 0):
  """init_params for the Trainer: --init's weights where paths match, fresh ones elsewhere."""
  hint = "; do not override config.model shape keys when fine-tuning"
  return lambda abstract: state_lib.params_from_workdir(
      init, abstract, model_cfg.initializer_range, seed, hint=hint)[0]


def load_split(config, tokenizer, key: str) -> features.Features:
  spec = config.data[key]
  records = data.read_records(spec, tfds_data_dir=config.data.tfds_data_dir,
                              key=f"config.data.{key}")
  is_main = jax.process_index() == 0
  if config.task.type == "seq2seq":
    feats = seq2seq.featurize(config.task, tokenizer, records, config.data.max_seq_len,
                              config.data.max_target_len)
    if feats.truncated and is_main:
      print(f"plmjax: cut {feats.truncated} of {len(records)} records of {spec} to "
            f"data.max_seq_len={config.data.max_seq_len} source / data.max_target_len="
            f"{config.data.max_target_len} target tokens (their ends)", flush=True)
    if key == "train" and config.data.packing:
      feats.arrays = seq2seq.pack(feats.arrays, seq2seq.special_ids(tokenizer)[1])
    return feats
  if config.task.type == "completion":
    feats = completion.featurize(config.task, tokenizer, records, config.data.max_seq_len)
    if feats.truncated and is_main:
      print(f"plmjax: cut {feats.truncated} of {len(records)} records of {spec} to "
            f"data.max_seq_len={config.data.max_seq_len} tokens (prompt start first)",
            flush=True)
    if key == "train" and config.data.packing:
      feats.arrays = completion.pack(feats.arrays)
    return feats
  feats = features.featurize(config.task, tokenizer, records, config.data.max_seq_len)
  if feats.skipped and is_main:
    print(f"plmjax: skipped {feats.skipped} of {len(records)} records of {spec} whose answer "
          "is not in the context", flush=True)
  return feats


def schedule(config, num_train_rows: int) -> list[int]:
  """Sets train.steps (from epochs) and warmup; returns the steps that end an evaluation."""
  t = config.train
  if t.epochs < 0:
    raise ConfigError(f"config.train.epochs={t.epochs} must be >= 0 (0: use train.steps)")
  if t.epochs:
    per_epoch = max(1, num_train_rows // t.batch_size)
    t.steps = t.epochs * per_epoch
    points = [per_epoch * e for e in range(1, t.epochs + 1)]
  else:
    every = t.eval_every_steps or t.steps
    points = sorted(set(range(every, t.steps, every)) | {t.steps})
  if t.warmup_ratio > 0:
    t.warmup_steps = int(round(t.warmup_ratio * t.steps))
  return points


def make_evaluate(trainer, task, feats: features.Features):
  """params -> task metrics over the whole validation set."""
  lay = trainer.layout
  forward = jax.jit(predict.make_forward(trainer.model, tasks.OUTPUTS[task.type]),
                    in_shardings=(lay.shardings["params"], lay.batch_sharding),
                    out_shardings=sharding.replicated(lay.mesh))

  def evaluate(params) -> dict:
    outs = {k: [] for k in tasks.OUTPUTS[task.type]}
    batches = data.eval_batches(feats.arrays, trainer.config.train.batch_size,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
    with trainer.context():
      for batch in batches:
        inputs = dict(model_inputs(batch), input_ids=batch["input_ids"])
        batch = sharding.global_batch(inputs, lay.mesh)
        for k, v in jax.device_get(forward(params, batch)).items():
          outs[k].append(np.asarray(v))
    n = len(feats.arrays["input_ids"])
    return tasks.compute_metrics(task, feats, {k: np.concatenate(v)[:n] for k, v in outs.items()})
  return evaluate


def run(config, init: str, workdir: str, overrides=(), *, signals=None, hooks=()):
  """Fine-tunes (or resumes) in `workdir`; returns the Trainer's Result (its
  eval_metrics are the final evaluation, also in DIR/eval_results.json)."""
  prepare_config(config, init, overrides)
  model_cfg = config_lib.validate(config)
  workdir_lib.check_usable(workdir, config)
  tokenizer = load_tokenizer(workdir_lib.tokenizer_dir(init))
  check_vocab(tokenizer, config.model.vocab_size, exact=False)
  if not config.data.train:
    raise ConfigError("config.data.train is empty; set it to a .jsonl/.tsv/.csv file or "
                      "tfds:NAME:SPLIT")
  is_main = jax.process_index() == 0
  if is_main:
    print(config_lib.summary(config), flush=True)
  train = load_split(config, tokenizer, "train")
  evaluation = load_split(config, tokenizer, "eval") if config.data.eval else None
  points = set(schedule(config, len(train.arrays["input_ids"])))
  config_lib.validate(config)  # train.steps and warmup as the schedule set them
  t, seq_len = config.train, config.data.max_seq_len
  model = build_model(model_cfg, config.task.head)
  if config.task.type == "seq2seq":  # a token is a source or a target token
    target_len = config.data.max_target_len
    flops = t5.training_flops(model_cfg, seq_len, target_len) / (seq_len + target_len)
    seq_len += target_len
  else:
    flops = flops_per_token(model_cfg, seq_len, 0)
  batches = data.BatchIterator(train.arrays, t.batch_size, seed=t.seed,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())
  start = batches.get_state()
  example = next(batches)
  batches.set_state(start)
  trainer = Trainer(config, workdir, model, tasks.OBJECTIVES[config.task.type], example,
                    flops_per_token=flops, tokens_per_example=seq_len,
                    init_params=pretrained_params(init, model_cfg, t.seed))
  if is_main:  # everything checked: now the workdir is written
    workdir_lib.write_config(workdir, config)
    tokenizer.save(workdir_lib.tokenizer_dir(workdir))
  evaluate = None
  if evaluation and config.task.type == "completion":
    evaluate = completion.make_evaluate(trainer, config.task, evaluation, tokenizer)
  elif evaluation and config.task.type == "seq2seq":
    evaluate = seq2seq.make_evaluate(trainer, config.task, evaluation, tokenizer)
  elif evaluation:
    evaluate = make_evaluate(trainer, config.task, evaluation)
  result = trainer.fit(batches, evaluate=evaluate, eval_due=points.__contains__,
                       signals=signals, hooks=hooks, desc="finetune")
  if is_main and result.step == t.steps:
    with open(os.path.join(workdir, "eval_results.json"), "w") as f:
      json.dump(dict(result.eval_metrics, step=t.steps), f, indent=2)
  return result
