"""`plmjax finetune`: a pretrained (or imported) BERT workdir -> a task model.

  plmjax finetune --config configs/finetune/sst2.py --init runs/bert_base --workdir runs/sst2

The model's shape keys and the tokenizer come from --init; the encoder weights are
copied from its newest checkpoint and the task head starts fresh. Training uses the
pretraining Trainer (sharding, checkpoints, metrics.jsonl, TensorBoard); the whole
validation set is evaluated at each epoch end, and DIR/eval_results.json holds the
final metrics. Running the same command again resumes.
"""

import json
import os

import jax
import numpy as np

from plmjax import config as config_lib
from plmjax.data.tokenizer import check_vocab, load_tokenizer
from plmjax.errors import CheckpointError, ConfigError
from plmjax.finetune import data, features, tasks
from plmjax.models import build_model
from plmjax.train import checkpoint, distributed, sharding
from plmjax.train.flops import flops_per_token
from plmjax.train.metrics_writer import MetricsWriter
from plmjax.train.trainer import Trainer

# config.model keys that stay as the fine-tuning config sets them (not taken from --init).
OWN_MODEL_KEYS = ("dropout_rate", "attention_dropout_rate", "num_labels")
MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


def add_arguments(parser):
  parser.add_argument("--config", required=True, help="e.g. configs/finetune/sst2.py")
  parser.add_argument("--init", required=True,
                      help="plmjax workdir to start from (pretrain or import-hf output)")
  parser.add_argument("--workdir", required=True, help="where the fine-tuned model goes")
  parser.epilog = "Override any config key with --config.KEY=VALUE, e.g. --config.train.epochs=2"


def main(args, overrides):
  config = config_lib.load_config_file(args.config)
  distributed.initialize_from_env()
  result = run(config, args.init, args.workdir, overrides)
  return 128 + 15 if result.get("preempted") else 0


def prepare_config(config, init: str, overrides=()):
  """The model section from --init, num_labels from the task, then the overrides."""
  if "task" not in config or "type" not in config.task:
    raise ConfigError("the config has no config.task.type; start fine-tuning configs from "
                      "plmjax.finetune.tasks.finetune_config (see configs/finetune/)")
  init_model = checkpoint.read_config(init).model
  if init_model.get("arch") != "bert":
    raise ConfigError(f"--init {init} holds a {init_model.get('arch')!r} model; fine-tuning "
                      "heads exist for BERT")
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

  def init_params(abstract):
    pretrained, step = checkpoint.load_params(init)
    flat = {_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(pretrained)[0]}
    rng = np.random.default_rng(seed)
    fresh, used = [], set()

    def pick(path, leaf):
      name = _name(path)
      if name in flat:
        value = flat[name]
        if tuple(value.shape) != tuple(leaf.shape):
          raise CheckpointError(f"{init}: parameter {name} has shape {tuple(value.shape)} but "
                                f"the model needs {tuple(leaf.shape)}; do not override "
                                "config.model shape keys when fine-tuning")
        used.add(name)
        return np.asarray(value, leaf.dtype)
      fresh.append(name)
      leaf_name = name.rsplit("/", 1)[-1]
      if leaf_name == "bias":
        return np.zeros(leaf.shape, leaf.dtype)
      if leaf_name == "scale":
        return np.ones(leaf.shape, leaf.dtype)
      return (rng.standard_normal(leaf.shape) * model_cfg.initializer_range).astype(leaf.dtype)

    params = jax.tree_util.tree_map_with_path(pick, abstract)
    if not used:
      raise CheckpointError(f"the checkpoint in {init} shares no parameter with the "
                            "fine-tuning model (expected names under bert/)")
    unused = sorted(set(flat) - used)
    if jax.process_index() == 0:
      print(f"plmjax: {len(used)} tensors from {init} (step {step}); newly initialised: "
            f"{', '.join(fresh) or 'none'}; not used: {_summary(unused)}", flush=True)
    return params

  return init_params


def _name(path) -> str:
  return "/".join(str(getattr(p, "key", p)) for p in path)


def _summary(names, limit: int = 4) -> str:
  if not names:
    return "none"
  return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_split(config, tokenizer, key: str) -> features.Features:
  spec = config.data[key]
  records = data.read_records(spec, tfds_data_dir=config.data.tfds_data_dir,
                              key=f"config.data.{key}")
  feats = features.featurize(config.task, tokenizer, records, config.data.max_seq_len)
  if feats.skipped and jax.process_index() == 0:
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


def make_predict(trainer, keys):
  """Jitted forward pass returning the `keys` outputs, replicated on every device."""
  model = trainer.model

  def forward(params, batch):
    out = model.apply({"params": params}, batch["input_ids"],
                      token_type_ids=batch["token_type_ids"],
                      attention_mask=batch["attention_mask"], deterministic=True)
    return {k: out[k] for k in keys}

  return jax.jit(forward, in_shardings=(trainer.param_sharding, trainer.batch_sharding),
                 out_shardings=sharding.replicated(trainer.mesh))


def evaluate(trainer, predict, task, feats: features.Features) -> dict:
  outs = {k: [] for k in tasks.OUTPUTS[task.type]}
  batches = data.eval_batches(feats.arrays, trainer.config.train.batch_size,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
  with trainer.context():
    for batch in batches:
      batch = sharding.global_batch({k: batch[k] for k in MODEL_INPUTS}, trainer.mesh)
      for k, v in jax.device_get(predict(trainer.state["params"], batch)).items():
        outs[k].append(np.asarray(v))
  n = len(feats.arrays["input_ids"])
  return tasks.compute_metrics(task, feats, {k: np.concatenate(v)[:n] for k, v in outs.items()})


def run(config, init: str, workdir: str, overrides=()) -> dict:
  """Fine-tunes (or resumes) in `workdir`; returns the final evaluation metrics."""
  prepare_config(config, init, overrides)
  tokenizer = load_tokenizer(checkpoint.tokenizer_subdir(init))
  check_vocab(tokenizer, config.model.vocab_size, exact=False)
  if not config.data.train:
    raise ConfigError("config.data.train is empty; set it to a .jsonl/.tsv/.csv file or "
                      "tfds:NAME:SPLIT")
  train = load_split(config, tokenizer, "train")
  evaluation = load_split(config, tokenizer, "eval") if config.data.eval else None
  points = schedule(config, len(train.arrays["input_ids"]))
  model_cfg = config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  checkpoint.check_same_model(workdir, config)
  is_main = jax.process_index() == 0
  if is_main:
    checkpoint.write_config(workdir, config)
    tokenizer.save(checkpoint.tokenizer_subdir(workdir))

  t = config.train

  def train_iter():
    return data.BatchIterator(train.arrays, t.batch_size, seed=t.seed,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())

  seq_len = config.data.max_seq_len
  trainer = Trainer(config, workdir, build_model(model_cfg, config.task.head),
                    tasks.OBJECTIVES[config.task.type], next(train_iter()),
                    flops_per_token=flops_per_token(model_cfg, seq_len, 0),
                    tokens_per_example=seq_len,
                    init_params=pretrained_params(init, model_cfg, t.seed))
  predict = make_predict(trainer, tasks.OUTPUTS[config.task.type])
  done = checkpoint.manager(workdir, read_only=True).latest_step() or 0
  writer = MetricsWriter(workdir, enabled=is_main)
  results = {}
  try:
    for point in [p for p in points if p > done] or [t.steps]:
      result = trainer.fit(train_iter(), None, stop_at=point if point < t.steps else None,
                           desc="finetune")
      if result.step < point:  # preempted (SIGTERM/SIGINT): the checkpoint is saved
        return dict(results, preempted=True)
      if evaluation is not None:
        results = evaluate(trainer, predict, config.task, evaluation)
        writer.write(point, results, split="eval")
        if is_main:
          print(f"plmjax: eval @ step {point}: " + ", ".join(
              f"{k}={v:.4g}" for k, v in results.items()), flush=True)
  finally:
    writer.close()
  if is_main:
    with open(os.path.join(workdir, "eval_results.json"), "w") as f:
      json.dump(dict(results, step=t.steps), f, indent=2)
  return results
