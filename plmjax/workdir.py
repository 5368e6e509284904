"""The layout of a plmjax workdir, shared by every command.

  DIR/config.json        the run's full config (ConfigDict JSON)
  DIR/tokenizer/         tokenizer.model, or tokenizer.json / vocab.txt
  DIR/checkpoints/STEP/  orbax checkpoints (or config.checkpoint.dir/STEP/, e.g. on gs://)
  DIR/metrics.jsonl      one JSON object per logged step
  DIR/tb/                TensorBoard events
  DIR/init.json          {"init": DIR0, "step": N}: the weights the run started from
                         (pretrain --init); absent for a run that started from scratch

Finding things here needs no training code: export, fine-tuning and generation read a
workdir through this module and plmjax.train.checkpoint.load_params.
"""

import json
import os

import ml_collections
from orbax.checkpoint import utils as ocp_utils

from plmjax.errors import CheckpointError
from plmjax.models.config import ModelConfig

# Keys of config.model that change parameter shapes: a workdir trained with other
# values cannot be resumed.
SHAPE_KEYS = ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads",
              "intermediate_size", "max_position_embeddings", "type_vocab_size",
              "num_decoder_layers", "attention_head_dim", "relative_attention_num_buckets",
              "feed_forward_proj", "tie_word_embeddings", "scan_layers")


def model_key(model: ml_collections.ConfigDict, key: str):
  """config.model[key], or its default for configs written before the key existed."""
  return model.get(key, getattr(ModelConfig(), key, None))


def config_path(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def tokenizer_dir(workdir: str) -> str:
  return os.path.join(workdir, "tokenizer")


def has_tokenizer(workdir: str) -> bool:
  path = tokenizer_dir(workdir)
  return os.path.isdir(path) and bool(os.listdir(path))


def checkpoint_dir(workdir: str, config: ml_collections.ConfigDict | None = None) -> str:
  """DIR/checkpoints, or `config.checkpoint.dir` when set (a local path or a URL such as
  gs://BUCKET/run/checkpoints, which orbax writes natively). Without `config`, the
  workdir's config.json decides."""
  if config is None:
    config = read_config(workdir) if os.path.isfile(config_path(workdir)) else None
  custom = config.checkpoint.get("dir", "") if config is not None else ""
  if custom:
    return custom if "://" in custom else os.path.abspath(custom)
  return os.path.join(os.path.abspath(workdir) if "://" not in workdir else workdir,
                      "checkpoints")


def checkpoint_steps(workdir: str, config: ml_collections.ConfigDict | None = None) -> list[int]:
  """Steps of the complete checkpoints; none if the directory is absent. Orbax commits a
  step by renaming its temporary directory, so a save cut short is never listed."""
  path = checkpoint_dir(workdir, config)
  if "://" not in path and not os.path.isdir(path):
    return []
  return sorted(ocp_utils.checkpoint_steps(path))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = config_path(workdir)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path} does not exist: {workdir!r} is not a plmjax workdir "
                          "(pretrain, finetune or import-hf create one)")
  with open(path) as f:
    try:
      values = json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path} is not valid JSON ({e})") from e
  return ml_collections.ConfigDict(_lists_to_tuples(values))


def write_config(workdir: str, config: ml_collections.ConfigDict):
  os.makedirs(workdir, exist_ok=True)
  path = config_path(workdir)
  text = config.to_json(indent=2)
  if os.path.isfile(path):
    with open(path) as f:
      if f.read() == text:
        return  # a resumed run leaves its workdir as it found it
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def init_path(workdir: str) -> str:
  return os.path.join(workdir, "init.json")


def read_init(workdir: str) -> dict | None:
  """The --init a run started from ({"init": path, "step": N}), or None."""
  path = init_path(workdir)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path} is not valid JSON ({e}); delete it or rerun with "
                            "--init DIR") from e


def write_init(workdir: str, init: str, step: int):
  os.makedirs(workdir, exist_ok=True)
  record = {"init": os.path.abspath(init) if "://" not in init else init, "step": int(step)}
  if read_init(workdir) == record:
    return
  path = init_path(workdir)
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=2)
  os.replace(path + ".tmp", path)


def _lists_to_tuples(value):
  if isinstance(value, dict):
    return {k: _lists_to_tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_lists_to_tuples(v) for v in value)
  return value


def check_usable(workdir: str, config: ml_collections.ConfigDict):
  """Refuses a workdir that is a file, or whose checkpoints hold another model shape."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise CheckpointError(f"--workdir {workdir} exists and is not a directory")
  if not os.path.isfile(config_path(workdir)):
    return
  old_config = read_config(workdir)
  old = old_config.model
  diffs = [f"model.{k}: workdir has {model_key(old, k)!r}, this run has "
           f"{model_key(config.model, k)!r}"
           for k in SHAPE_KEYS if model_key(old, k) != model_key(config.model, k)]
  old_head, head = _head(old_config), _head(config)
  if old_head != head:  # another head is another parameter tree
    diffs.append(f"task.head: workdir has {old_head!r}, this run has {head!r}")
  if diffs and checkpoint_steps(workdir, old_config):
    raise CheckpointError(
        f"workdir {workdir!r} holds checkpoints of another model ({'; '.join(diffs)}); "
        "use a new --workdir, or the same model settings to resume")


def _head(config) -> str | None:
  task = config.get("task")
  return task.get("head") if task is not None else None
